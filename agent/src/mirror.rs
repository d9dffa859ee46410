//! This host's disks mirrored to the peer (HA): QEMU's `blockdev-mirror` with `copy-mode:
//! write-blocking`, driven over QMP through libvirt (notes/sync-disk-mirror.md, Recipe A).
//!
//! For each disk the peer's replica is added as block nodes behind the socket that leads to
//! the peer's NBD server, and a mirror job copies the disk's top node into them. Once the job
//! is ready *and* actively synced, every guest write completes only after it reached both
//! hosts. The job is never completed (that would pivot the guest onto the peer's copy); a
//! stop cancels it, which in the ready state is a clean stop.
//!
//! ```text
//!  guest ─► virtio ua-vda ─► mirror filter ─► libvirt-N-format ─► local volume
//!                                 │   job pv-mirror-vda (sync full, then write-blocking)
//!                                 └─► [pv-peer-vda-qcow2 ─►] pv-peer-vda (nbd) ─► peer socket
//! ```
//!
//! Every name derives from the guest device, so the mirror's state lives in QEMU alone: an
//! agent restart loses nothing, and [`status`] reads it back. The disk's own top node is found
//! through its device (the user alias `ua-vda`, see [`domain::disk_alias`]) in `query-block`,
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

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde::de::{DeserializeOwned, IgnoredAny};
use serde_json::{Value, json};

use crate::domain::{self, DiskFormat};
use crate::libvirt::{self, Libvirt, Monitor};

/// Prefix of the mirror jobs' IDs; the guest device follows.
const JOB_PREFIX: &str = "pv-mirror-";
/// Prefix of the NBD target nodes' names; the guest device follows.
const PEER_PREFIX: &str = "pv-peer-";
/// Suffix of a qcow2 target node's name (over the NBD node of the same device).
const QCOW2_SUFFIX: &str = "-qcow2";
/// How long a cancelled job may take to end. A ready mirror ends once its in-flight writes
/// reached the peer (milliseconds); a slow peer or a loaded host gets the rest.
const END_TIMEOUT: Duration = Duration::from_secs(30);
/// Pause between two looks at a job that is ending.
const END_POLL: Duration = Duration::from_millis(50);

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
    /// A cancelled mirror job did not end in time.
    #[error(
        "mirror job {job} did not end within {} s; QEMU may be stuck writing to the peer",
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
    /// The initial copy runs.
    Syncing,
    /// In sync: every write is on both hosts before the guest sees it complete.
    Ready,
    /// The mirror broke or ended; the peer's copy falls behind.
    Failed {
        /// Why, in QEMU's words where it gave any.
        error: String,
    },
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
    /// Bytes copied so far (grows past `length` with the synchronous writes).
    pub offset: u64,
    /// Bytes to copy.
    pub length: u64,
}

/// Mirrors each of `disks` of the running domain `uuid` to the peer's replica behind
/// `peer_socket`. A disk whose mirror runs is left alone; a broken or ended one is cleaned up
/// and started again. Returns the mirrors' states right after.
pub async fn start(
    libvirt: &Libvirt,
    uuid: &str,
    disks: &[MirrorDisk],
    peer_socket: &Path,
) -> Result<Vec<DiskMirror>, Error> {
    let (vm, disks, socket) = (uuid.to_string(), disks.to_vec(), peer_socket.to_path_buf());
    libvirt
        .with_monitor(uuid, move |m| {
            for disk in &disks {
                start_disk(m, &vm, disk, &socket)?;
            }
            read_status(m)
        })
        .await
}

/// The mirrors of the running domain `uuid`, in disk order; empty when none runs.
pub async fn status(libvirt: &Libvirt, uuid: &str) -> Result<Vec<DiskMirror>, Error> {
    libvirt.with_monitor(uuid, read_status).await
}

/// Stops every mirror of the domain `uuid` and removes its target nodes; the peer's copy
/// falls behind from here on. A domain without mirrors, or not running (its QEMU and mirrors
/// are gone), is left as it is.
pub async fn stop(libvirt: &Libvirt, uuid: &str) -> Result<(), Error> {
    let vm = uuid.to_string();
    let stopped = libvirt
        .with_monitor(uuid, move |m| {
            for job in query_jobs(m)?
                .iter()
                .filter(|j| device_of_job(&j.device).is_some())
            {
                let outcome = end_job(m, job)?;
                tracing::info!(vm, job = %job.device, %outcome, "mirror job stopped");
            }
            remove_targets(m, &vm, None)
        })
        .await;
    match stopped {
        Err(Error::Libvirt(libvirt::Error::DomainNotRunning { .. })) => Ok(()),
        other => other,
    }
}

/// Starts the mirror of one disk unless it runs already.
fn start_disk(m: &Monitor<'_>, vm: &str, disk: &MirrorDisk, socket: &Path) -> Result<(), Error> {
    let job_id = format!("{JOB_PREFIX}{}", disk.device);
    let job = query_jobs(m)?.into_iter().find(|j| j.device == job_id);
    if let Some(job) = job.as_ref().filter(|j| !j.status.ended()) {
        let nodes = query_nodes(m)?;
        if let Some(running) = export_of(&nodes, &disk.device).filter(|e| *e != disk.export) {
            return Err(Error::MirroredElsewhere {
                device: disk.device.clone(),
                running,
                asked: disk.export.clone(),
            });
        }
        tracing::info!(vm, job = %job_id, status = ?job.status, "mirror job runs; left alone");
        return Ok(());
    }
    if let Some(job) = &job {
        let outcome = end_job(m, job)?;
        tracing::info!(vm, job = %job_id, %outcome, "ended mirror job cleaned up before a new start");
    }
    remove_targets(m, vm, Some(&disk.device))?;
    let source = find_source(m, vm, &disk.device)?;
    let target = add_target(m, disk, socket)?;
    let mirror = json!({"job-id": job_id, "device": source, "target": target, "sync": "full",
        "copy-mode": "write-blocking", "auto-dismiss": false});
    if let Err(e) = execute::<IgnoredAny>(m, "blockdev-mirror", &mirror) {
        // Best effort: the refusal is what the caller needs to see.
        let _ = remove_targets(m, vm, Some(&disk.device));
        return Err(e);
    }
    tracing::info!(vm, job = %job_id, block_node = %source, target = %target, export = %disk.export, "mirror job started");
    Ok(())
}

/// The node on top of the disk of guest device `device`, from `query-block`.
fn find_source(m: &Monitor<'_>, vm: &str, device: &str) -> Result<String, Error> {
    let blocks: Vec<BlockInfo> = execute(m, "query-block", &json!({}))?;
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
        Error::Refused { desc, .. } => Error::PeerUnreachable {
            export: disk.export.clone(),
            socket: socket.to_path_buf(),
            desc,
        },
        other => other,
    })?;
    if disk.format == DiskFormat::Raw {
        return Ok(nbd);
    }
    let qcow2 = format!("{nbd}{QCOW2_SUFFIX}");
    let add = json!({"driver": "qcow2", "node-name": qcow2, "file": nbd});
    if let Err(e) = execute::<IgnoredAny>(m, "blockdev-add", &add) {
        // Best effort: the refusal is what the caller needs to see.
        let _ = execute::<IgnoredAny>(m, "blockdev-del", &json!({"node-name": nbd}));
        return Err(e);
    }
    Ok(qcow2)
}

/// Removes the target nodes of `device` (of every device if `None`), qcow2 nodes first.
fn remove_targets(m: &Monitor<'_>, vm: &str, device: Option<&str>) -> Result<(), Error> {
    let mut names: Vec<String> = query_nodes(m)?
        .into_iter()
        .map(|n| n.node_name)
        .filter(|name| {
            name.strip_prefix(PEER_PREFIX).is_some_and(|rest| {
                let dev = rest.strip_suffix(QCOW2_SUFFIX).unwrap_or(rest);
                device.is_none_or(|d| d == dev)
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
    let ended = wait_ended(m, &job.device)?;
    let outcome = ended
        .as_ref()
        .and_then(|j| j.error.clone())
        .unwrap_or_else(|| "cancelled".to_string());
    if ended.is_some() {
        execute::<IgnoredAny>(m, "job-dismiss", &json!({"id": job.device}))?;
    }
    Ok(outcome)
}

/// Waits until job `id` has concluded (returned) or is gone (`None`).
fn wait_ended(m: &Monitor<'_>, id: &str) -> Result<Option<BlockJob>, Error> {
    let deadline = Instant::now() + END_TIMEOUT;
    loop {
        let job = query_jobs(m)?.into_iter().find(|j| j.device == id);
        match job {
            None => return Ok(None),
            Some(j) if j.status == JobStatus::Concluded => return Ok(Some(j)),
            Some(_) if Instant::now() >= deadline => {
                return Err(Error::JobStuck {
                    job: id.to_string(),
                    timeout: END_TIMEOUT,
                });
            }
            Some(_) => std::thread::sleep(END_POLL),
        }
    }
}

fn read_status(m: &Monitor<'_>) -> Result<Vec<DiskMirror>, Error> {
    let jobs = query_jobs(m)?;
    let nodes = query_nodes(m)?;
    Ok(mirrors_of(&jobs, &nodes))
}

fn query_jobs(m: &Monitor<'_>) -> Result<Vec<BlockJob>, Error> {
    execute(m, "query-block-jobs", &json!({}))
}

fn query_nodes(m: &Monitor<'_>) -> Result<Vec<NamedNode>, Error> {
    execute(m, "query-named-block-nodes", &json!({"flat": true}))
}

/// Runs `command` and reads its `return` as `T`.
fn execute<T: DeserializeOwned>(
    m: &Monitor<'_>,
    command: &'static str,
    arguments: &Value,
) -> Result<T, Error> {
    let text = m.qmp(&json!({"execute": command, "arguments": arguments}).to_string())?;
    parse_reply(command, &text)
}

/// A QMP reply: `{"return": ...}` or `{"error": {"class", "desc"}}`.
#[derive(Debug, Deserialize)]
struct Reply<T> {
    #[serde(rename = "return")]
    value: Option<T>,
    error: Option<QmpError>,
}

#[derive(Debug, Deserialize)]
struct QmpError {
    class: String,
    desc: String,
}

/// An entry of `query-block`: a guest device and the node on top of its disk.
#[derive(Debug, Deserialize)]
struct BlockInfo {
    #[serde(default)]
    qdev: String,
    inserted: Option<Inserted>,
}

#[derive(Debug, Deserialize)]
struct Inserted {
    #[serde(rename = "node-name")]
    node_name: String,
}

/// An entry of `query-block-jobs`; `device` is the job's ID.
#[derive(Debug, Deserialize)]
struct BlockJob {
    device: String,
    status: JobStatus,
    len: u64,
    offset: u64,
    #[serde(default)]
    ready: bool,
    #[serde(rename = "actively-synced", default)]
    actively_synced: bool,
    error: Option<String>,
}

/// QEMU's job states (`JobStatus`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum JobStatus {
    Created,
    Running,
    Paused,
    Ready,
    Standby,
    Waiting,
    Pending,
    Aborting,
    Concluded,
    Null,
    #[serde(other)]
    Undefined,
}

impl JobStatus {
    /// Whether the job no longer copies anything (it is ending or has ended).
    fn ended(self) -> bool {
        matches!(
            self,
            JobStatus::Aborting | JobStatus::Concluded | JobStatus::Null
        )
    }
}

/// An entry of `query-named-block-nodes`.
#[derive(Debug, Deserialize)]
struct NamedNode {
    #[serde(rename = "node-name", default)]
    node_name: String,
    #[serde(default)]
    file: String,
}

/// Reads a reply to `command`: its value, or QEMU's refusal as [`Error::Refused`].
fn parse_reply<T: DeserializeOwned>(command: &'static str, text: &str) -> Result<T, Error> {
    let bad = |source| Error::BadReply {
        command,
        reply: text.to_string(),
        source,
    };
    let reply: Reply<T> = serde_json::from_str(text).map_err(bad)?;
    match reply {
        Reply { error: Some(e), .. } => Err(Error::Refused {
            command,
            class: e.class,
            desc: e.desc,
        }),
        Reply {
            value: Some(value), ..
        } => Ok(value),
        Reply { .. } => Err(bad(serde::de::Error::custom(
            "neither \"return\" nor \"error\"",
        ))),
    }
}

/// The node on top of the disk of guest device `device`: the one its virtio device uses.
fn source_node(blocks: &[BlockInfo], device: &str) -> Option<String> {
    let alias = domain::disk_alias(device);
    let path = format!("/machine/peripheral/{alias}/virtio-backend");
    blocks
        .iter()
        .find(|b| b.qdev == path || b.qdev == alias)
        .and_then(|b| b.inserted.as_ref())
        .map(|i| i.node_name.clone())
}

/// The guest device a mirror job's ID stands for (`None` for other jobs).
fn device_of_job(id: &str) -> Option<&str> {
    id.strip_prefix(JOB_PREFIX)
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
    if let Some(text) = file.strip_prefix("json:") {
        let options: Value = serde_json::from_str(text).ok()?;
        return options.get("export")?.as_str().map(str::to_string);
    }
    let rest = file.strip_prefix("nbd+unix:///")?;
    let export = rest.split_once("?socket=").map_or(rest, |(e, _)| e);
    Some(export.to_string())
}

/// The mirrors `jobs` and `nodes` show, in disk order (vda … vdz, vdaa …).
fn mirrors_of(jobs: &[BlockJob], nodes: &[NamedNode]) -> Vec<DiskMirror> {
    let mut mirrors: Vec<DiskMirror> = jobs
        .iter()
        .filter_map(|job| {
            let device = device_of_job(&job.device)?;
            Some(DiskMirror {
                device: device.to_string(),
                export: export_of(nodes, device).unwrap_or_default(),
                state: state_of(job),
                offset: job.offset,
                length: job.len,
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
            state: MirrorState::Failed {
                error: "the mirror job is gone while its target remains".to_string(),
            },
            offset: 0,
            length: 0,
        })
        .collect();
    mirrors.extend(orphans);
    mirrors.sort_by(|a, b| (a.device.len(), &a.device).cmp(&(b.device.len(), &b.device)));
    mirrors
}

/// A job's state: ready only when QEMU says both `ready` and `actively-synced`.
fn state_of(job: &BlockJob) -> MirrorState {
    match (&job.error, job.status.ended()) {
        (Some(error), _) => MirrorState::Failed {
            error: error.clone(),
        },
        (None, true) => MirrorState::Failed {
            error: "the mirror job ended (cancelled) and copies no more writes".to_string(),
        },
        (None, false) if job.ready && job.actively_synced => MirrorState::Ready,
        (None, false) => MirrorState::Syncing,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `query-block` of a libvirt 9.0 domain with two disks (QEMU 10.0.2), shortened.
    const QUERY_BLOCK: &str = r#"{"return":[{"io-status":"ok","device":"","locked":false,"removable":false,"inserted":{"node-name":"libvirt-2-format","drv":"raw","file":"/sg0/a.raw","ro":false},"qdev":"/machine/peripheral/ua-vda/virtio-backend","type":"unknown"},{"io-status":"ok","device":"","locked":false,"removable":false,"inserted":{"node-name":"libvirt-1-format","drv":"qcow2","file":"/sg0/b.qcow2","ro":false},"qdev":"/machine/peripheral/ua-vdb/virtio-backend","type":"unknown"}],"id":"libvirt-477"}"#;

    /// `query-block-jobs`: vdb's mirror failed (peer lost), vda's is in sync.
    const QUERY_JOBS: &str = r#"{"return":[{"auto-finalize":true,"io-status":"ok","device":"pv-mirror-vdb","auto-dismiss":false,"busy":false,"len":16777216,"offset":4096,"status":"concluded","paused":false,"speed":0,"ready":false,"type":"mirror","actively-synced":false,"error":"Input/output error"},{"auto-finalize":true,"io-status":"ok","device":"pv-mirror-vda","auto-dismiss":false,"busy":false,"len":16781312,"offset":16781312,"status":"ready","paused":false,"speed":0,"ready":true,"type":"mirror","actively-synced":true}],"id":"libvirt-11"}"#;

    /// `query-named-block-nodes` (flat) while both mirrors exist, shortened.
    const QUERY_NODES: &str = r##"{"return":[{"node-name":"#block084","drv":"mirror_top","file":"/sg0/a.raw"},{"node-name":"pv-peer-vdb-qcow2","drv":"qcow2","file":"nbd+unix:///b.qcow2?socket=/state/peer-nbd.sock"},{"node-name":"pv-peer-vdb","drv":"nbd","file":"nbd+unix:///b.qcow2?socket=/state/peer-nbd.sock"},{"node-name":"pv-peer-vda","drv":"nbd","file":"nbd+unix:///a.raw?socket=/state/peer-nbd.sock"},{"node-name":"libvirt-2-format","drv":"raw","file":"/sg0/a.raw"}],"id":"libvirt-12"}"##;

    fn jobs(text: &str) -> Vec<BlockJob> {
        parse_reply("query-block-jobs", text).unwrap()
    }

    fn nodes(text: &str) -> Vec<NamedNode> {
        parse_reply("query-named-block-nodes", text).unwrap()
    }

    #[test]
    fn parse_reply_error_becomes_refused_with_command_and_desc() {
        let text = r#"{"id":"libvirt-11","error":{"class":"GenericError","desc":"Duplicate nodes with node-name='pv-peer-vda'"}}"#;

        let err = parse_reply::<IgnoredAny>("blockdev-add", text).unwrap_err();

        assert!(
            matches!(&err, Error::Refused { command: "blockdev-add", class, desc }
                if class == "GenericError" && desc == "Duplicate nodes with node-name='pv-peer-vda'"),
            "{err:?}"
        );
    }

    #[test]
    fn parse_reply_without_return_or_error_is_bad_reply() {
        let err = parse_reply::<IgnoredAny>("query-block", r#"{"id":"libvirt-1"}"#).unwrap_err();

        assert!(
            matches!(
                err,
                Error::BadReply {
                    command: "query-block",
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn parse_reply_garbage_is_bad_reply() {
        let err = parse_reply::<IgnoredAny>("query-block", "not json").unwrap_err();

        assert!(matches!(err, Error::BadReply { .. }), "{err:?}");
    }

    #[test]
    fn source_node_second_disk_is_found_by_its_device_not_its_number() {
        let blocks: Vec<BlockInfo> = parse_reply("query-block", QUERY_BLOCK).unwrap();

        let node = source_node(&blocks, "vda");

        assert_eq!(node.as_deref(), Some("libvirt-2-format"));
    }

    #[test]
    fn source_node_unknown_device_is_none() {
        let blocks: Vec<BlockInfo> = parse_reply("query-block", QUERY_BLOCK).unwrap();

        let node = source_node(&blocks, "vdc");

        assert_eq!(node, None);
    }

    #[test]
    fn mirrors_of_jobs_reports_ready_and_failed_in_disk_order() {
        let (jobs, nodes) = (jobs(QUERY_JOBS), nodes(QUERY_NODES));

        let mirrors = mirrors_of(&jobs, &nodes);

        assert_eq!(
            mirrors,
            vec![
                DiskMirror {
                    device: "vda".into(),
                    export: "a.raw".into(),
                    state: MirrorState::Ready,
                    offset: 16781312,
                    length: 16781312,
                },
                DiskMirror {
                    device: "vdb".into(),
                    export: "b.qcow2".into(),
                    state: MirrorState::Failed {
                        error: "Input/output error".into()
                    },
                    offset: 4096,
                    length: 16777216,
                },
            ]
        );
    }

    #[test]
    fn mirrors_of_ready_job_not_actively_synced_is_syncing() {
        let text = r#"{"return":[{"device":"pv-mirror-vda","len":100,"offset":100,"status":"ready","ready":true,"actively-synced":false,"type":"mirror"}]}"#;

        let mirrors = mirrors_of(&jobs(text), &[]);

        assert_eq!(mirrors[0].state, MirrorState::Syncing);
    }

    #[test]
    fn mirrors_of_cancelled_job_without_error_is_failed() {
        let text = r#"{"return":[{"device":"pv-mirror-vda","len":100,"offset":100,"status":"concluded","ready":false,"actively-synced":true,"type":"mirror"}]}"#;

        let mirrors = mirrors_of(&jobs(text), &[]);

        assert!(matches!(mirrors[0].state, MirrorState::Failed { .. }));
    }

    #[test]
    fn mirrors_of_target_without_job_is_failed() {
        let text = r#"{"return":[{"node-name":"pv-peer-vdc","drv":"nbd","file":"nbd+unix:///c.raw?socket=/s"}]}"#;

        let mirrors = mirrors_of(&[], &nodes(text));

        assert_eq!(
            mirrors,
            vec![DiskMirror {
                device: "vdc".into(),
                export: "c.raw".into(),
                state: MirrorState::Failed {
                    error: "the mirror job is gone while its target remains".into()
                },
                offset: 0,
                length: 0,
            }]
        );
    }

    #[test]
    fn mirrors_of_other_jobs_is_empty() {
        let text = r#"{"return":[{"device":"backup0","len":1,"offset":0,"status":"running","ready":false,"type":"backup"}]}"#;

        let mirrors = mirrors_of(&jobs(text), &[]);

        assert!(mirrors.is_empty());
    }

    #[test]
    fn mirrors_of_sorts_vdaa_after_vdz() {
        let text = r#"{"return":[{"device":"pv-mirror-vdaa","len":1,"offset":0,"status":"running","type":"mirror"},{"device":"pv-mirror-vdz","len":1,"offset":0,"status":"running","type":"mirror"}]}"#;

        let mirrors = mirrors_of(&jobs(text), &[]);

        assert_eq!(
            mirrors
                .iter()
                .map(|m| m.device.as_str())
                .collect::<Vec<_>>(),
            vec!["vdz", "vdaa"]
        );
    }

    #[test]
    fn export_in_filename_json_form_reads_export() {
        let export = export_in_filename(
            r#"json:{"driver":"nbd","export":"d0.raw","server":{"type":"unix","path":"/s"}}"#,
        );

        assert_eq!(export.as_deref(), Some("d0.raw"));
    }

    #[test]
    fn export_in_filename_local_file_is_none() {
        let export = export_in_filename("/sg0/a.raw");

        assert_eq!(export, None);
    }

    #[test]
    fn job_status_unknown_word_is_undefined() {
        let status: JobStatus = serde_json::from_str(r#""someday""#).unwrap();

        assert_eq!(status, JobStatus::Undefined);
    }
}
