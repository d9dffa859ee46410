//! Exports: a stopped VM, or one of its snapshots, streamed as an OVA archive.
//!
//! ```text
//!  pvctl ── ExportVm ──► serving controller ── ExportVolume (per disk) ──► agent of a host
//!                         (engine: check, hold the VM)                     with a current copy
//!        ◄─ Begin{size} ─ sizes of every converted disk ◄──── size ─────── qemu-img convert
//!        ◄─ tar bytes ─── OVF descriptor, each disk's VMDK ◄─ bytes, SHA ─  to a temp VMDK
//!        ◄─ End{sha256} ─ manifest (SHA-256 of each file), two zero blocks
//! ```
//! The engine decides ([`check`]: which copy is read, and that nothing changes it meanwhile);
//! this module only frames the bytes. Each disk's SHA-256 is checked against its agent's
//! before the manifest vouches for it; a broken disk stream ends the export with an error.
//! The client writes the archive to a temporary file and keeps it only when the size and the
//! final SHA-256 match.

use proto::agent as agent_pb;
use proto::v1 as pb;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tonic::Status;

use crate::agents::{self, Agent, Token};
use crate::error::ApiError;
use crate::model::{SnapshotState, VmRecord, VmState};
use crate::ova::{ovf, tar};

/// Bytes per message to the client.
const CHUNK: usize = 1 << 20;

/// An admitted export: what to read, where, under which authority.
#[derive(Debug)]
pub struct Plan {
    /// The VM as recorded when the export began.
    pub record: VmRecord,
    /// The host whose copy is read.
    pub node: String,
    /// Its agent.
    pub agent: Agent,
    /// The snapshot exported, if one is.
    pub snapshot: Option<String>,
    /// The serving term and the VM's generation.
    pub token: Token,
}

/// The host to read an export of `record` (or of its snapshot `snapshot`) from: a stopped
/// VM's disks on a host with a current copy, or a ready snapshot on a host that keeps it,
/// the VM's own host first; `usable` says whether a host is up.
pub fn check(
    record: &VmRecord,
    snapshot: Option<&str>,
    usable: impl Fn(&str) -> bool,
) -> Result<String, ApiError> {
    let name = &record.name;
    let mut candidates = match snapshot {
        None => {
            if record.state != VmState::Stopped {
                return Err(ApiError::FailedPrecondition(format!(
                    "VM {name} is {}; export it once stopped (pvctl vm-shutdown {name}), or export a snapshot of it: pvctl vm-snapshot-create {name}, then pvctl vm-export {name} --snapshot ID",
                    record.state.name()
                )));
            }
            let current = &record.protection.current;
            if current.is_empty() {
                vec![record.node.clone()]
            } else {
                current.iter().cloned().collect()
            }
        }
        Some(id) => {
            let s = record
                .snapshots
                .iter()
                .find(|s| s.id == id)
                .ok_or_else(|| ApiError::SnapshotNotFound {
                    vm: name.clone(),
                    id: id.to_string(),
                })?;
            if s.state != SnapshotState::Ready {
                return Err(ApiError::FailedPrecondition(format!(
                    "snapshot {id} of VM {name} is being taken or deleted; export another"
                )));
            }
            s.nodes.clone()
        }
    };
    candidates.sort_by_key(|n| *n != record.node);
    candidates.into_iter().find(|n| usable(n)).ok_or_else(|| {
        ApiError::Unavailable(format!(
            "no host that keeps the data of VM {name} to export is up; retry once one is"
        ))
    })
}

/// The chunk stream's sender.
pub type Sender = mpsc::Sender<Result<pb::ExportVmChunk, Status>>;

/// Streams the OVA of `plan` on `tx`, all but its last message: the [`pb::ExportEnd`]
/// returned, which the caller sends once the VM is released (a script's next command must
/// find it free).
pub async fn run(plan: &Plan, tx: &Sender) -> Result<(u64, pb::ExportEnd), ApiError> {
    let record = &plan.record;
    let mut disks = Vec::with_capacity(record.disks.len());
    let mut streams = Vec::with_capacity(record.disks.len());
    for (i, volume) in agents::replica_volumes(record).into_iter().enumerate() {
        let mut stream = plan
            .agent
            .export_volume(record, volume, plan.snapshot.as_deref(), plan.token)
            .await?;
        let size = match next(&plan.node, &mut stream).await? {
            Some(agent_pb::export_volume_chunk::Part::SizeBytes(size)) => size,
            _ => return Err(broken(&plan.node, i, "it did not start with its size")),
        };
        disks.push(ovf::DiskFile {
            href: ovf::disk_name(&record.name, i),
            size,
            capacity: record.disks[i].size_bytes,
        });
        streams.push(stream);
    }
    let descriptor = ovf::descriptor(record, &disks, plan.snapshot.as_deref());
    let mut names = vec![ovf::descriptor_name(&record.name)];
    names.extend(disks.iter().map(|d| d.href.clone()));
    let manifest_len = ovf::manifest_len(&names);
    let total = tar::entry_len(descriptor.len() as u64)
        + disks.iter().map(|d| tar::entry_len(d.size)).sum::<u64>()
        + tar::entry_len(manifest_len)
        + tar::TRAILER.len() as u64;
    let begin = pb::ExportBegin {
        size_bytes: total,
        node: plan.node.clone(),
    };
    send(tx, pb::export_vm_chunk::Part::Begin(begin)).await?;

    let mtime = u64::try_from(crate::now_unix_ms() / 1000).unwrap_or(0);
    let mut out = Out::new(tx);
    let mut sums = Vec::with_capacity(names.len());
    out.file(&names[0], descriptor.into_bytes(), mtime).await?;
    sums.push(hex(Sha256::digest(out.last_file())));
    for (i, (disk, stream)) in disks.iter().zip(&mut streams).enumerate() {
        out.put(tar::header(&disk.href, disk.size, mtime).to_vec())
            .await?;
        let sha256 = copy_disk(&plan.node, i, disk.size, stream, &mut out).await?;
        out.put(tar::padding(disk.size)).await?;
        sums.push(sha256);
    }
    let files: Vec<(String, String)> = names.iter().cloned().zip(sums).collect();
    let manifest = ovf::manifest(&files);
    out.file(
        &ovf::manifest_name(&record.name),
        manifest.into_bytes(),
        mtime,
    )
    .await?;
    out.put(tar::TRAILER.to_vec()).await?;
    if out.sent != total {
        return Err(ApiError::Internal(format!(
            "the archive came to {} bytes, not the {total} announced",
            out.sent
        )));
    }
    let end = pb::ExportEnd {
        sha256: hex(out.hash.finalize_reset()),
    };
    Ok((total, end))
}

/// Sends the archive's last message.
pub async fn finish(tx: &Sender, end: pb::ExportEnd) -> Result<(), ApiError> {
    send(tx, pb::export_vm_chunk::Part::End(end)).await
}

/// Copies disk `index`'s bytes from its agent's stream into the archive, checking its size
/// and its agent's SHA-256; returns that SHA-256.
async fn copy_disk(
    node: &str,
    index: usize,
    size: u64,
    stream: &mut tonic::Streaming<agent_pb::ExportVolumeChunk>,
    out: &mut Out<'_>,
) -> Result<String, ApiError> {
    let (mut hash, mut got) = (Sha256::new(), 0u64);
    loop {
        match next(node, stream).await? {
            Some(agent_pb::export_volume_chunk::Part::Data(data)) => {
                got += data.len() as u64;
                if got > size {
                    return Err(broken(node, index, "it sent more bytes than announced"));
                }
                hash.update(&data);
                out.put(data).await?;
            }
            Some(agent_pb::export_volume_chunk::Part::Sha256(sha256)) => {
                let ours = hex(hash.finalize());
                if got != size || sha256 != ours {
                    return Err(broken(node, index, "its size or checksum does not match"));
                }
                return Ok(ours);
            }
            Some(agent_pb::export_volume_chunk::Part::SizeBytes(_)) | None => {
                return Err(broken(node, index, "it ended early"));
            }
        }
    }
}

/// The next part of an agent's stream; `None` when it ended.
async fn next(
    node: &str,
    stream: &mut tonic::Streaming<agent_pb::ExportVolumeChunk>,
) -> Result<Option<agent_pb::export_volume_chunk::Part>, ApiError> {
    match stream.message().await {
        Ok(Some(chunk)) => Ok(chunk.part),
        Ok(None) => Ok(None),
        Err(status) => Err(ApiError::from(agents::Error::Call {
            node: node.to_string(),
            op: "exporting a volume",
            code: status.code(),
            message: status.message().to_string(),
        })),
    }
}

fn broken(node: &str, index: usize, why: &str) -> ApiError {
    ApiError::Unavailable(format!(
        "the export of disk {} from host {node} broke off: {why}",
        index + 1
    ))
}

async fn send(tx: &Sender, part: pb::export_vm_chunk::Part) -> Result<(), ApiError> {
    tx.send(Ok(pb::ExportVmChunk { part: Some(part) }))
        .await
        .map_err(|_| gone())
}

fn gone() -> ApiError {
    ApiError::Unavailable("the client stopped reading the export".into())
}

fn hex(digest: impl AsRef<[u8]>) -> String {
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// The archive going out: every byte hashed and counted, sent in chunks.
struct Out<'a> {
    tx: &'a Sender,
    hash: Sha256,
    sent: u64,
    last: Vec<u8>,
}

impl<'a> Out<'a> {
    fn new(tx: &'a Sender) -> Out<'a> {
        Out {
            tx,
            hash: Sha256::new(),
            sent: 0,
            last: Vec::new(),
        }
    }

    /// Sends `bytes` as the next part of the archive.
    async fn put(&mut self, bytes: Vec<u8>) -> Result<(), ApiError> {
        // A disk's chunk from its agent is sent on as it is, not copied.
        let pieces = if bytes.len() <= CHUNK {
            vec![bytes]
        } else {
            bytes.chunks(CHUNK).map(<[u8]>::to_vec).collect()
        };
        for piece in pieces {
            self.hash.update(&piece);
            self.sent += piece.len() as u64;
            send(self.tx, pb::export_vm_chunk::Part::Data(piece)).await?;
        }
        Ok(())
    }

    /// Sends a small file `name` whole: header, bytes, padding; kept for its checksum.
    async fn file(&mut self, name: &str, bytes: Vec<u8>, mtime: u64) -> Result<(), ApiError> {
        let size = bytes.len() as u64;
        self.put(tar::header(name, size, mtime).to_vec()).await?;
        self.put(bytes.clone()).await?;
        self.put(tar::padding(size)).await?;
        self.last = bytes;
        Ok(())
    }

    /// The bytes of the last file sent whole.
    fn last_file(&self) -> &[u8] {
        &self.last
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::model::{Consistency, Mode, Snapshot};

    fn stopped() -> VmRecord {
        crate::placement::tests::vm("web", Mode::Ha, 1, 256, "n0")
    }

    fn snapshot(id: &str, state: SnapshotState, nodes: &[&str]) -> Snapshot {
        Snapshot {
            id: id.into(),
            description: String::new(),
            created_unix_ms: 0,
            consistency: Consistency::Crash,
            nodes: nodes.iter().map(|n| n.to_string()).collect(),
            bytes: 0,
            incremental: false,
            freeze_us: 0,
            state,
        }
    }

    #[test]
    fn a_stopped_vm_is_read_on_its_host() {
        assert_eq!(check(&stopped(), None, |_| true).expect("admitted"), "n0");
    }

    #[test]
    fn a_running_vm_is_refused_with_the_snapshot_way() {
        let mut vm = stopped();
        vm.state = VmState::Running;

        let refused = check(&vm, None, |_| true).expect_err("refused");

        assert!(refused.to_string().contains("--snapshot"), "{refused}");
    }

    #[test]
    fn a_current_copy_on_the_peer_serves_when_the_host_is_down() {
        let mut vm = stopped();
        vm.protection.current = BTreeSet::from(["n0".to_string(), "n1".to_string()]);

        assert_eq!(check(&vm, None, |n| n == "n1").expect("admitted"), "n1");
    }

    #[test]
    fn a_snapshot_is_read_where_it_is_kept_and_must_be_ready() {
        let mut vm = stopped();
        vm.state = VmState::Running;
        vm.snapshots = vec![
            snapshot("1", SnapshotState::Ready, &["n1"]),
            snapshot("2", SnapshotState::Creating, &["n0"]),
        ];

        assert_eq!(check(&vm, Some("1"), |_| true).expect("admitted"), "n1");
        assert!(matches!(
            check(&vm, Some("2"), |_| true),
            Err(ApiError::FailedPrecondition(_))
        ));
        assert!(matches!(
            check(&vm, Some("9"), |_| true),
            Err(ApiError::SnapshotNotFound { .. })
        ));
        assert!(matches!(
            check(&vm, Some("1"), |_| false),
            Err(ApiError::Unavailable(_))
        ));
    }
}
