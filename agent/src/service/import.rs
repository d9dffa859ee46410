//! Imports: a new volume filled from a disk image streamed by the controller ([`import`]).
//! Each logs a begin and an end line with the VM, the volume and the outcome; a stream that
//! breaks or ends without its commit leaves nothing.

use proto::agent as pb;
use tonic::Streaming;

use super::{Error, Inner, disk_format, invalid, uuid_invalid};
use crate::import::{self, ImageFormat, Target};

impl Inner {
    /// Receives, checks and converts the image `stream` carries into a new volume.
    pub(super) async fn import_volume(
        &self,
        mut stream: Streaming<pb::ImportVolumeRequest>,
    ) -> Result<pb::ImportedVolume, Error> {
        let header = match stream.message().await {
            Ok(Some(pb::ImportVolumeRequest {
                part: Some(pb::import_volume_request::Part::Header(header)),
            })) => header,
            Ok(_) => return Err(invalid("an import must start with its header")),
            Err(status) => return Err(invalid(format!("the import broke off: {status}"))),
        };
        if uuid_invalid(&header.vm_uuid) {
            return Err(invalid(format!(
                "vm_uuid {:?} is not a UUID",
                header.vm_uuid
            )));
        }
        let format = image_format(header.source_format())?;
        let volume = header
            .volume
            .clone()
            .ok_or_else(|| invalid("an import names its volume"))?;
        let target = Target {
            group: volume.storage_group.clone(),
            name: volume.volume.clone(),
            format: disk_format(volume.format())?,
            size_bytes: volume.size_bytes,
        };
        self.admit("import-volume", &header.vm_uuid, header.fence)?;
        let vm = &header.vm_uuid;
        tracing::info!(vm = %vm, node = %self.node, volume = %target.name, format = format.as_str(), bytes = header.source_bytes, "import volume begin");
        let outcome = self.fill(&header, &target, format, &mut stream).await;
        match &outcome {
            Ok(imported) => {
                tracing::info!(vm = %vm, node = %self.node, volume = %target.name, image_bytes = imported.image_virtual_bytes, "import volume end: in place");
            }
            Err(e) => {
                tracing::warn!(vm = %vm, node = %self.node, volume = %target.name, error = %daemon::error_chain(e), "import volume end: failed, nothing kept");
            }
        }
        outcome
    }

    async fn fill(
        &self,
        header: &pb::ImportVolumeHeader,
        target: &Target,
        format: ImageFormat,
        stream: &mut Streaming<pb::ImportVolumeRequest>,
    ) -> Result<pb::ImportedVolume, Error> {
        let storage = &self.deps.storage;
        let mut upload = import::receive(storage, target, header.source_bytes)?;
        let sha256 = loop {
            let part = match stream.message().await {
                Ok(Some(pb::ImportVolumeRequest { part: Some(part) })) => part,
                Ok(None) => {
                    return Err(invalid(
                        "the import ended without its commit; nothing was kept",
                    ));
                }
                Ok(Some(pb::ImportVolumeRequest { part: None })) => {
                    return Err(invalid("an import part is empty"));
                }
                Err(status) => return Err(invalid(format!("the import broke off: {status}"))),
            };
            match part {
                pb::import_volume_request::Part::Data(data) => {
                    upload = upload.append(data).await.map_err(import::Error::from)?;
                }
                pb::import_volume_request::Part::CommitSha256(sha256) => break sha256,
                pb::import_volume_request::Part::Header(_) => {
                    return Err(invalid("an import has one header, first"));
                }
            }
        };
        // Another controller may serve now (and roll this import back): it must not make the
        // volume after that.
        self.admit("import-volume", &header.vm_uuid, header.fence)?;
        let image = import::commit(upload, sha256, format).await?;
        let still_asked = || {
            self.admit("import-volume", &header.vm_uuid, header.fence)
                .is_ok()
        };
        let image_virtual_bytes = import::install(storage, &image, target, still_asked).await?;
        Ok(pb::ImportedVolume {
            image_virtual_bytes,
            size_bytes: target.size_bytes,
        })
    }
}

fn image_format(format: pb::ImageFormat) -> Result<ImageFormat, Error> {
    match format {
        pb::ImageFormat::Raw => Ok(ImageFormat::Raw),
        pb::ImageFormat::Qcow2 => Ok(ImageFormat::Qcow2),
        pb::ImageFormat::Vmdk => Ok(ImageFormat::Vmdk),
        pb::ImageFormat::Invalid => Err(invalid("an import states its image's format")),
    }
}
