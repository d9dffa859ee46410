//! The block QMP the mirror and the snapshots speak through libvirt: one way to send a
//! command, and the replies they read (`query-block`, `query-block-jobs`,
//! `query-named-block-nodes` with their dirty bitmaps). Replies keep only the fields used;
//! QEMU 10.0.2's shapes are in the tests.

use serde::Deserialize;
use serde::de::{DeserializeOwned, IgnoredAny};
use serde_json::{Value, json};

use crate::domain;
use crate::libvirt::{self, Monitor};

/// Errors of a block QMP command.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// libvirt could not reach the domain's QEMU monitor.
    #[error(transparent)]
    Libvirt(#[from] libvirt::Error),
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
    /// QEMU's reply did not parse.
    #[error("unexpected QMP reply to {command}: {reply}")]
    BadReply {
        /// The QMP command.
        command: &'static str,
        /// The reply text.
        reply: String,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
}

/// Runs `command` and reads its `return` as `T`.
pub(crate) fn execute<T: DeserializeOwned>(
    m: &Monitor<'_>,
    command: &'static str,
    arguments: &Value,
) -> Result<T, Error> {
    let text = m.qmp(&json!({"execute": command, "arguments": arguments}).to_string())?;
    parse_reply(command, &text)
}

/// Runs `actions` in one QMP `transaction`: QEMU drains the disks' I/O around it, so no write
/// is in flight while a bitmap is added, cleared or removed.
pub(crate) fn transaction(m: &Monitor<'_>, actions: &[Value]) -> Result<(), Error> {
    execute::<IgnoredAny>(m, "transaction", &json!({ "actions": actions })).map(drop)
}

/// Every block job of the domain.
pub(crate) fn query_jobs(m: &Monitor<'_>) -> Result<Vec<BlockJob>, Error> {
    execute(m, "query-block-jobs", &json!({}))
}

/// Every named block node of the domain, each with its dirty bitmaps.
pub(crate) fn query_nodes(m: &Monitor<'_>) -> Result<Vec<NamedNode>, Error> {
    execute(m, "query-named-block-nodes", &json!({"flat": true}))
}

/// The domain's block devices.
pub(crate) fn query_blocks(m: &Monitor<'_>) -> Result<Vec<BlockInfo>, Error> {
    execute(m, "query-block", &json!({}))
}

/// Every guest device's I/O counters since its QEMU started.
pub(crate) fn query_blockstats(m: &Monitor<'_>) -> Result<Vec<BlockStatsEntry>, Error> {
    execute(m, "query-blockstats", &json!({}))
}

/// An entry of `query-blockstats`: a guest device's counters.
#[derive(Debug, Deserialize)]
pub(crate) struct BlockStatsEntry {
    /// The guest device's QOM path (or its ID).
    #[serde(default)]
    pub qdev: String,
    /// Its counters.
    pub stats: BlockStats,
}

/// The write counters of a `query-blockstats` entry.
#[derive(Debug, Deserialize)]
pub(crate) struct BlockStats {
    /// Writes completed.
    pub wr_operations: u64,
    /// Their total time from submission to completion, in nanoseconds.
    pub wr_total_time_ns: u64,
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
pub(crate) struct BlockInfo {
    /// The guest device's QOM path (or its ID).
    #[serde(default)]
    pub qdev: String,
    /// The medium, when one is inserted.
    pub inserted: Option<Inserted>,
}

/// The medium of a `query-block` entry (implicit filters such as a mirror's are skipped).
#[derive(Debug, Deserialize)]
pub(crate) struct Inserted {
    /// The node on top of the disk.
    #[serde(rename = "node-name")]
    pub node_name: String,
    /// Its filename: the image path for a local file.
    #[serde(default)]
    pub file: String,
}

/// An entry of `query-block-jobs`; `device` is the job's ID.
#[derive(Debug, Deserialize)]
pub(crate) struct BlockJob {
    /// The job's ID.
    pub device: String,
    /// Where the job stands.
    pub status: JobStatus,
    /// Bytes to copy.
    pub len: u64,
    /// Bytes copied.
    pub offset: u64,
    /// A mirror's initial copy is done.
    #[serde(default)]
    pub ready: bool,
    /// A write-blocking mirror copies every write before completing it.
    #[serde(rename = "actively-synced", default)]
    pub actively_synced: bool,
    /// Why the job failed.
    pub error: Option<String>,
}

impl BlockJob {
    /// Whether the job ended without error.
    pub fn succeeded(&self) -> bool {
        self.status == JobStatus::Concluded && self.error.is_none()
    }

    /// Whether the mirror is in sync: ready, actively synced, not ending, no error.
    pub fn in_sync(&self) -> bool {
        self.ready && self.actively_synced && !self.status.ended() && self.error.is_none()
    }
}

/// QEMU's job states (`JobStatus`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum JobStatus {
    /// Created, not started.
    Created,
    /// Copying.
    Running,
    /// Paused.
    Paused,
    /// A mirror's initial copy is done.
    Ready,
    /// Ready, paused.
    Standby,
    /// Waiting for its transaction.
    Waiting,
    /// Finalizing.
    Pending,
    /// Being cancelled or failed.
    Aborting,
    /// Ended; waits to be dismissed.
    Concluded,
    /// Gone.
    Null,
    /// A state this code does not know.
    #[serde(other)]
    Undefined,
}

impl JobStatus {
    /// Whether the job no longer copies anything (it is ending or has ended).
    pub fn ended(self) -> bool {
        matches!(
            self,
            JobStatus::Aborting | JobStatus::Concluded | JobStatus::Null
        )
    }
}

/// An entry of `query-named-block-nodes`.
#[derive(Debug, Deserialize)]
pub(crate) struct NamedNode {
    /// The node's name.
    #[serde(rename = "node-name", default)]
    pub node_name: String,
    /// Its filename (an NBD node's names its export and socket).
    #[serde(default)]
    pub file: String,
    /// Its driver, e.g. "raw", "qcow2", "file", "nbd".
    #[serde(default)]
    pub drv: String,
    /// Its dirty bitmaps.
    #[serde(rename = "dirty-bitmaps", default)]
    pub bitmaps: Vec<Bitmap>,
}

/// A dirty bitmap of a node (`BlockDirtyInfo`).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub(crate) struct Bitmap {
    /// Its name.
    #[serde(default)]
    pub name: String,
    /// Dirty bytes (whole granules).
    pub count: u64,
    /// Whether writes still set bits.
    #[serde(default)]
    pub recording: bool,
    /// Whether a job holds it.
    #[serde(default)]
    pub busy: bool,
    /// Whether QEMU found it inconsistent (it cannot be used).
    #[serde(default)]
    pub inconsistent: bool,
}

/// The bitmap `name` and the node holding it.
pub(crate) fn find_bitmap<'a>(nodes: &'a [NamedNode], name: &str) -> Option<(&'a str, &'a Bitmap)> {
    nodes.iter().find_map(|n| {
        let bitmap = n.bitmaps.iter().find(|b| b.name == name)?;
        Some((n.node_name.as_str(), bitmap))
    })
}

/// The node on top of the disk of guest device `device`: the one its virtio device uses.
pub(crate) fn source_node(blocks: &[BlockInfo], device: &str) -> Option<String> {
    block_of(blocks, device)
        .and_then(|b| b.inserted.as_ref())
        .map(|i| i.node_name.clone())
}

/// The filename of the disk of guest device `device` (its image path for a local file).
pub(crate) fn disk_file<'a>(blocks: &'a [BlockInfo], device: &str) -> Option<&'a str> {
    block_of(blocks, device)
        .and_then(|b| b.inserted.as_ref())
        .map(|i| i.file.as_str())
}

fn block_of<'a>(blocks: &'a [BlockInfo], device: &str) -> Option<&'a BlockInfo> {
    let alias = domain::disk_alias(device);
    let path = format!("/machine/peripheral/{alias}/virtio-backend");
    blocks.iter().find(|b| b.qdev == path || b.qdev == alias)
}

/// The guest device of a `query-block` entry of ours (its alias `ua-<device>`).
pub(crate) fn device_of_block(block: &BlockInfo) -> Option<String> {
    device_of_qdev(&block.qdev)
}

/// The guest device of one of our disks' QOM path or ID.
pub(crate) fn device_of_qdev(qdev: &str) -> Option<String> {
    let id = qdev
        .strip_prefix("/machine/peripheral/")
        .and_then(|rest| rest.strip_suffix("/virtio-backend"))
        .unwrap_or(qdev);
    let device = id.strip_prefix(&domain::disk_alias(""))?;
    (!device.is_empty() && domain::disk_alias(device) == id).then(|| device.to_string())
}

/// Reads a reply to `command`: its value, or QEMU's refusal as [`Error::Refused`].
pub(crate) fn parse_reply<T: DeserializeOwned>(
    command: &'static str,
    text: &str,
) -> Result<T, Error> {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// `query-named-block-nodes` (flat) of QEMU 10.0.2 during a resync, shortened: the disk's
    /// node holds the resync bitmap (busy: a backup job uses it) and the verify marker.
    const NODES_WITH_BITMAPS: &str = r#"{"return":[{"node-name":"libvirt-1-format","drv":"raw","file":"/sg0/a.raw","dirty-bitmaps":[{"name":"pv-verify-vda","recording":false,"persistent":false,"busy":false,"granularity":2147483648,"count":0},{"name":"pv-resync-vda","recording":true,"persistent":false,"busy":true,"granularity":65536,"count":720896}]},{"node-name":"pv-peer-vda","drv":"nbd","file":"nbd+unix:///a.raw?socket=/s"}],"id":"libvirt-20"}"#;

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
    fn job_status_unknown_word_is_undefined() {
        let status: JobStatus = serde_json::from_str(r#""someday""#).unwrap();

        assert_eq!(status, JobStatus::Undefined);
    }

    #[test]
    fn find_bitmap_reads_count_busy_and_node() {
        let nodes: Vec<NamedNode> =
            parse_reply("query-named-block-nodes", NODES_WITH_BITMAPS).unwrap();

        let found = find_bitmap(&nodes, "pv-resync-vda");

        assert_eq!(
            found,
            Some((
                "libvirt-1-format",
                &Bitmap {
                    name: "pv-resync-vda".into(),
                    count: 720_896,
                    recording: true,
                    busy: true,
                    inconsistent: false,
                }
            ))
        );
    }

    #[test]
    fn find_bitmap_absent_is_none() {
        let nodes: Vec<NamedNode> =
            parse_reply("query-named-block-nodes", NODES_WITH_BITMAPS).unwrap();

        let found = find_bitmap(&nodes, "pv-resync-vdb");

        assert_eq!(found, None);
    }

    #[test]
    fn block_job_concluded_backup_without_error_succeeded() {
        let text = r#"{"return":[{"device":"pv-backup-vda","len":720896,"offset":720896,"status":"concluded","type":"backup"}]}"#;
        let jobs: Vec<BlockJob> = parse_reply("query-block-jobs", text).unwrap();

        let succeeded = jobs[0].succeeded();

        assert!(succeeded);
    }
}
