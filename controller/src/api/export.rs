//! Exports translated: the engine admits one and holds the VM, [`crate::export`] streams
//! the archive, and the engine lets the VM go when the stream ends, however it ends (before
//! the client hears the end, so its next command finds the VM free).

use std::pin::Pin;

use proto::v1 as pb;
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use crate::engine::{Command, EngineHandle};
use crate::error::{ApiError, chain};

/// The archive's chunks.
pub(super) type ExportStream =
    Pin<Box<dyn Stream<Item = Result<pb::ExportVmChunk, Status>> + Send>>;

/// Admits the export `message` asks for and streams it from a task of its own.
pub(super) async fn serve(
    engine: EngineHandle,
    message: pb::ExportVmRequest,
) -> Result<ExportStream, ApiError> {
    let snapshot = (!message.snapshot.is_empty()).then_some(message.snapshot);
    let plan = engine
        .call(|reply| Command::ExportBegin {
            vm: message.vm,
            snapshot,
            reply,
        })
        .await?;
    let (tx, rx) = mpsc::channel(8);
    tokio::spawn(async move {
        let (vm, node) = (plan.record.name.clone(), plan.node.clone());
        let snapshot = plan.snapshot.clone();
        tracing::info!(vm = %vm, node = %node, snapshot = ?snapshot, "export begin");
        // A client that leaves while the disks convert ends the export at once: dropping
        // the agents' streams makes them remove their temporary files.
        let outcome = tokio::select! {
            outcome = crate::export::run(&plan, &tx) => outcome,
            () = tx.closed() => Err(ApiError::Unavailable(
                "the client stopped reading the export".into(),
            )),
        };
        let uuid = plan.record.uuid.clone();
        if let Err(e) = engine
            .call(|reply| Command::ExportEnd { uuid, reply })
            .await
        {
            tracing::warn!(vm = %vm, error = %chain(&e), "releasing the VM after its export failed; a new serving controller holds nothing");
        }
        let sent = match outcome {
            Ok((bytes, end)) => crate::export::finish(&tx, end).await.map(|()| bytes),
            Err(e) => Err(e),
        };
        match sent {
            Ok(bytes) => {
                tracing::info!(vm = %vm, node = %node, snapshot = ?snapshot, bytes, "export end: ok");
            }
            Err(e) => {
                tracing::warn!(vm = %vm, node = %node, snapshot = ?snapshot, error = %chain(&e), "export end: failed");
                let _ = tx.send(Err(Status::from(e))).await;
            }
        }
    });
    Ok(Box::pin(ReceiverStream::new(rx)))
}
