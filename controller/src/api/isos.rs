//! The ISO library's calls translated: an upload's stream into engine commands around
//! [`crate::isos::upload::fan_out`], the library into its listing.

use proto::v1 as pb;
use tokio_stream::StreamExt;
use tonic::Streaming;

use super::convert::broke_off;
use crate::engine::{Command, EngineHandle, Snapshot};
use crate::error::ApiError;
use crate::incoming::Part;
use crate::isos::upload;
use crate::isos::{self, Header};
use crate::model::{IsoRecord, IsoState};

/// Runs an upload to its end. It runs on a task of its own, so an uploader that goes away
/// mid-way still has its partial copies removed.
pub(super) async fn add(
    engine: EngineHandle,
    stream: Streaming<pb::AddIsoRequest>,
) -> Result<pb::Iso, ApiError> {
    tokio::spawn(upload_to_end(engine, stream))
        .await
        .map_err(|e| ApiError::Internal(format!("the upload task failed: {e}")))?
}

async fn upload_to_end(
    engine: EngineHandle,
    mut stream: Streaming<pb::AddIsoRequest>,
) -> Result<pb::Iso, ApiError> {
    let header = match stream.message().await {
        Ok(Some(pb::AddIsoRequest {
            part: Some(pb::add_iso_request::Part::Header(header)),
        })) => header,
        Ok(_) => {
            return Err(ApiError::invalid(
                "header",
                "an ISO upload starts with its header",
            ));
        }
        Err(status) => return Err(broke_off(&status)),
    };
    let header = Header {
        name: header.name,
        storage_group: header.storage_group,
        size_bytes: header.size_bytes,
    };
    let started = engine
        .call(|reply| Command::IsoBegin { header, reply })
        .await?;
    let name = started.record.name.clone();
    let parts = stream.map(|message| match message {
        Ok(pb::AddIsoRequest {
            part: Some(pb::add_iso_request::Part::Data(data)),
        }) => Ok(Part::Data(data)),
        Ok(pb::AddIsoRequest {
            part: Some(pb::add_iso_request::Part::Sha256(sha256)),
        }) => Ok(Part::Sha256(sha256)),
        Ok(_) => Err(ApiError::invalid(
            "header",
            "an ISO upload has one header, first",
        )),
        Err(status) => Err(broke_off(&status)),
    });
    let outcome = upload::fan_out(&started.record, started.term, started.targets, parts).await;
    let reported = outcome.clone().map_err(|e| e.to_string());
    let record = engine
        .call(|reply| Command::IsoFinish {
            name,
            outcome: reported,
            reply,
        })
        .await;
    outcome?;
    Ok(iso_to_pb(&record?, Vec::new()))
}

/// The library, each ISO with the VMs that boot from it.
pub(super) fn list(snapshot: &Snapshot) -> pb::ListIsosResponse {
    pb::ListIsosResponse {
        isos: snapshot
            .isos
            .values()
            .map(|iso| iso_to_pb(iso, isos::users(&iso.name, snapshot.vms.values())))
            .collect(),
    }
}

fn iso_to_pb(iso: &IsoRecord, used_by: Vec<String>) -> pb::Iso {
    pb::Iso {
        name: iso.name.clone(),
        storage_group: iso.storage_group.clone(),
        size_bytes: iso.size_bytes,
        sha256: iso.sha256.clone(),
        created_unix_ms: iso.created_unix_ms,
        used_by,
        state: iso_state_to_pb(iso.state).into(),
    }
}

fn iso_state_to_pb(state: IsoState) -> pb::IsoState {
    match state {
        IsoState::Uploading => pb::IsoState::Uploading,
        IsoState::Ready => pb::IsoState::Ready,
        IsoState::Deleting => pb::IsoState::Deleting,
    }
}
