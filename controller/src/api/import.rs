//! An import's stream translated: its header into [`crate::import::Header`], its parts into
//! bytes for [`crate::import::run`].

use proto::v1 as pb;
use tokio_stream::StreamExt;
use tonic::Streaming;

use super::convert::{broke_off, format_from_pb, mode_from_pb};
use crate::engine::EngineHandle;
use crate::error::ApiError;
use crate::import::{self, Format, Header, ImageFormat, Overrides};
use crate::incoming::Part;
use crate::model::{Boot, VmRecord};

/// Runs an import to its end. It runs on a task of its own, so an importer that goes away
/// mid-way still has what was made removed.
pub(super) async fn import(
    engine: EngineHandle,
    stream: Streaming<pb::ImportVmRequest>,
) -> Result<VmRecord, ApiError> {
    tokio::spawn(import_to_end(engine, stream))
        .await
        .map_err(|e| ApiError::Internal(format!("the import task failed: {e}")))?
}

async fn import_to_end(
    engine: EngineHandle,
    mut stream: Streaming<pb::ImportVmRequest>,
) -> Result<VmRecord, ApiError> {
    let header = match stream.message().await {
        Ok(Some(pb::ImportVmRequest {
            part: Some(pb::import_vm_request::Part::Header(header)),
        })) => header_from_pb(header)?,
        Ok(_) => {
            return Err(ApiError::invalid(
                "header",
                "an import starts with its header",
            ));
        }
        Err(status) => return Err(broke_off(&status)),
    };
    let parts = stream.map(|message| match message {
        Ok(pb::ImportVmRequest {
            part: Some(pb::import_vm_request::Part::Data(data)),
        }) => Ok(Part::Data(data)),
        Ok(pb::ImportVmRequest {
            part: Some(pb::import_vm_request::Part::Sha256(sha256)),
        }) => Ok(Part::Sha256(sha256)),
        Ok(_) => Err(ApiError::invalid(
            "header",
            "an import has one header, first",
        )),
        Err(status) => Err(broke_off(&status)),
    });
    import::run(&engine, header, parts).await
}

fn header_from_pb(h: pb::ImportVmHeader) -> Result<Header, ApiError> {
    let format = match pb::ImportFormat::try_from(h.format) {
        Ok(pb::ImportFormat::Ova) => Format::Ova,
        Ok(pb::ImportFormat::Raw) => Format::Image(ImageFormat::Raw),
        Ok(pb::ImportFormat::Qcow2) => Format::Image(ImageFormat::Qcow2),
        Ok(pb::ImportFormat::Vmdk) => Format::Image(ImageFormat::Vmdk),
        Ok(pb::ImportFormat::Invalid) | Err(_) => {
            return Err(ApiError::invalid(
                "format",
                "state what is imported: ova, raw, qcow2 or vmdk",
            ));
        }
    };
    if h.size_bytes == 0 {
        return Err(ApiError::invalid("size_bytes", "the file is empty"));
    }
    let some = |s: String| (!s.is_empty()).then_some(s);
    Ok(Header {
        file_name: h.file_name,
        size_bytes: h.size_bytes,
        format,
        overrides: Overrides {
            name: some(h.name),
            mode: match h.mode {
                0 => None,
                mode => Some(mode_from_pb(mode)?),
            },
            vcpus: (h.vcpus > 0).then_some(h.vcpus),
            memory_mib: (h.memory_mib > 0).then_some(h.memory_mib),
            storage_group: some(h.storage_group),
            disk_format: match h.disk_format {
                0 => None,
                format => Some(format_from_pb(format)?),
            },
            networks: h.networks,
            boot: match h.boot {
                Some(pb::import_vm_header::Boot::KernelImage(image)) => {
                    Some(Boot::Kernel { image })
                }
                Some(pb::import_vm_header::Boot::Iso(name)) => Some(Boot::Iso {
                    name,
                    storage_group: String::new(),
                }),
                None => None,
            },
        },
    })
}
