//! Exports: a volume, or one of its snapshots, converted ([`export`]) and streamed to the
//! controller that assembles the OVA. Each logs a begin and an end line with the VM, the
//! volume and the outcome; the temporary file goes when the stream ends or its reader leaves.

use std::pin::Pin;

use proto::agent as pb;
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use super::{Error, Inner, disk_format, invalid, plain_name, uuid_invalid};
use crate::export::{self, Converted};
use crate::libvirt::DomainState;
use crate::snapshot::SnapVolume;

/// The chunks of one exported volume.
pub(super) type ExportStream =
    Pin<Box<dyn Stream<Item = Result<pb::ExportVolumeChunk, Status>> + Send>>;

/// Bytes per data chunk.
const CHUNK: usize = 1 << 20;

impl Inner {
    /// Checks an export request and starts converting; the stream carries the outcome.
    pub(super) async fn export_volume(
        &self,
        req: pb::ExportVolumeRequest,
    ) -> Result<ExportStream, Error> {
        if uuid_invalid(&req.vm_uuid) {
            return Err(invalid(format!("vm_uuid {:?} is not a UUID", req.vm_uuid)));
        }
        if !req.snapshot.is_empty() && !plain_name(&req.snapshot) {
            return Err(invalid(format!("{:?} is not a snapshot ID", req.snapshot)));
        }
        let volume = req
            .volume
            .ok_or_else(|| invalid("an export names its volume"))?;
        let volume = SnapVolume {
            group: volume.storage_group.clone(),
            name: volume.volume.clone(),
            format: disk_format(volume.format())?,
            size_bytes: volume.size_bytes,
        };
        self.admit("export-volume", &req.vm_uuid, req.fence)?;
        if req.snapshot.is_empty() {
            let state = self.deps.libvirt.status(&req.vm_uuid).await?.state;
            if !matches!(state, DomainState::Shutoff | DomainState::Undefined) {
                return Err(export::Error::Running { uuid: req.vm_uuid }.into());
            }
        }
        let (tx, rx) = mpsc::channel(4);
        let (storage, node) = (self.deps.storage.clone(), self.node.clone());
        tokio::spawn(async move {
            let snapshot = (!req.snapshot.is_empty()).then_some(req.snapshot.as_str());
            tracing::info!(vm = %req.vm_uuid, node = %node, volume = %volume.name, snapshot = ?snapshot, "export volume begin");
            let began = std::time::Instant::now();
            let outcome = match export::convert(&storage, &volume, snapshot).await {
                Ok(converted) => {
                    let convert_ms = began.elapsed().as_millis();
                    send(converted, &tx).await.map(|bytes| (bytes, convert_ms))
                }
                Err(e) => {
                    let status = Status::from(Error::from(e));
                    let message = status.message().to_string();
                    let _ = tx.send(Err(status)).await;
                    Err(message)
                }
            };
            match outcome {
                Ok((bytes, convert_ms)) => {
                    let total_ms = began.elapsed().as_millis();
                    tracing::info!(vm = %req.vm_uuid, node = %node, volume = %volume.name, bytes, convert_ms, total_ms, "export volume end: sent");
                }
                Err(e) => {
                    tracing::warn!(vm = %req.vm_uuid, node = %node, volume = %volume.name, error = %e, "export volume end: failed; its temporary file is removed");
                }
            }
        });
        Ok(Box::pin(ReceiverStream::new(rx)))
    }
}

/// Sends `converted`'s size, bytes and SHA-256 on `tx`; the bytes sent, or why it stopped.
async fn send(
    converted: Converted,
    tx: &mpsc::Sender<Result<pb::ExportVolumeChunk, Status>>,
) -> Result<u64, String> {
    let chunk = |part| Ok(pb::ExportVolumeChunk { part: Some(part) });
    let gone = || "the controller stopped reading".to_string();
    tx.send(chunk(pb::export_volume_chunk::Part::SizeBytes(
        converted.size,
    )))
    .await
    .map_err(|_| gone())?;
    let mut file = tokio::fs::File::open(converted.file.path())
        .await
        .map_err(|e| format!("opening {}: {e}", converted.file.path().display()))?;
    let (mut hash, mut sent) = (Sha256::new(), 0u64);
    loop {
        let mut buf = vec![0u8; CHUNK];
        let n = file
            .read(&mut buf)
            .await
            .map_err(|e| format!("reading {}: {e}", converted.file.path().display()))?;
        if n == 0 {
            break;
        }
        buf.truncate(n);
        hash.update(&buf);
        sent += n as u64;
        tx.send(chunk(pb::export_volume_chunk::Part::Data(buf)))
            .await
            .map_err(|_| gone())?;
    }
    if sent != converted.size {
        let message = format!(
            "{} changed while it was sent ({sent} of {} bytes)",
            converted.file.path().display(),
            converted.size
        );
        let _ = tx.send(Err(Status::internal(message.clone()))).await;
        return Err(message);
    }
    let sha256 = format!("{:x}", hash.finalize());
    tx.send(chunk(pb::export_volume_chunk::Part::Sha256(sha256)))
        .await
        .map_err(|_| gone())?;
    Ok(sent)
}
