//! A bare disk image imported as a VM with that one disk: its virtual size read from its own
//! header (a raw image's is its length), its bytes streamed to the VM's host, committed once
//! the uploader's size and SHA-256 match.

use tokio_stream::Stream;

use super::{Begun, CHUNK, Header, ImageFormat, commit, create, open_disk, send};
use crate::engine::EngineHandle;
use crate::error::ApiError;
use crate::incoming::{Incoming, Part};
use crate::model::VmRecord;
use crate::ova::read::{Appliance, DiskFile};

const QCOW2_MAGIC: &[u8] = b"QFI\xfb";
/// A hosted sparse extent: a VMDK whose data is in the same file.
const VMDK_MAGIC: &[u8] = b"KDMV";

/// The virtual size the image of `format` whose first bytes are `head` states; a raw
/// image's is its `size`.
pub fn virtual_size(format: ImageFormat, head: &[u8], size: u64) -> Result<u64, ApiError> {
    let field = |at: usize| -> Option<[u8; 8]> { head.get(at..at + 8)?.try_into().ok() };
    let virtual_bytes = match format {
        ImageFormat::Raw => Some(size),
        ImageFormat::Qcow2 if head.starts_with(QCOW2_MAGIC) => field(24).map(u64::from_be_bytes),
        ImageFormat::Qcow2 => {
            return Err(ApiError::invalid(
                "format",
                "the file is not a qcow2 image: it lacks the qcow2 magic",
            ));
        }
        // The capacity is in 512-byte sectors.
        ImageFormat::Vmdk if head.starts_with(VMDK_MAGIC) => {
            field(12).and_then(|s| u64::from_le_bytes(s).checked_mul(512))
        }
        ImageFormat::Vmdk => {
            return Err(ApiError::invalid(
                "format",
                "the file is not a VMDK with its data inside (monolithic sparse or stream-optimized); a descriptor-only VMDK names other files and is not imported",
            ));
        }
    };
    match virtual_bytes {
        Some(bytes) if bytes > 0 => Ok(bytes),
        _ => Err(ApiError::invalid(
            "format",
            "the image states no virtual size; it is empty or damaged",
        )),
    }
}

/// The VM name a file name gives: its name without the extension.
fn stem(file: &str) -> String {
    let name = file.rsplit('/').next().unwrap_or(file);
    name.rsplit_once('.')
        .map_or(name, |(stem, _)| stem)
        .to_string()
}

/// Imports the bare image `header` announces.
pub(super) async fn run<S>(
    engine: &EngineHandle,
    header: &Header,
    format: ImageFormat,
    mut incoming: Incoming<S>,
) -> Result<VmRecord, ApiError>
where
    S: Stream<Item = Result<Part, ApiError>> + Unpin,
{
    let head = incoming.peek(512).await?.to_vec();
    let capacity = virtual_size(format, &head, header.size_bytes)?;
    let appliance = Appliance {
        name: stem(&header.file_name),
        disks: vec![DiskFile {
            href: header.file_name.clone(),
            capacity,
        }],
        ..Appliance::default()
    };
    let spec = super::spec(&appliance, &header.overrides, &header.file_name)?;
    let bytes = header.size_bytes;
    create(engine, spec, move |begun: Begun| async move {
        let mut feed = open_disk(&begun, 0, format, bytes)?;
        while let Some(data) = incoming.read_some(CHUNK).await? {
            send(&mut feed, data).await?;
        }
        let sha256 = incoming.finish().await?;
        commit(&begun, 0, feed, sha256).await
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_come_from_each_formats_header() {
        let mut qcow2 = vec![0u8; 64];
        qcow2[..4].copy_from_slice(QCOW2_MAGIC);
        qcow2[24..32].copy_from_slice(&(5u64 << 20).to_be_bytes());
        let mut vmdk = vec![0u8; 64];
        vmdk[..4].copy_from_slice(VMDK_MAGIC);
        vmdk[12..20].copy_from_slice(&2048u64.to_le_bytes());

        assert_eq!(virtual_size(ImageFormat::Raw, b"", 4096).unwrap(), 4096);
        assert_eq!(
            virtual_size(ImageFormat::Qcow2, &qcow2, 1).unwrap(),
            5 << 20
        );
        assert_eq!(virtual_size(ImageFormat::Vmdk, &vmdk, 1).unwrap(), 1 << 20);
    }

    #[test]
    fn an_image_not_of_its_stated_format_is_refused() {
        let descriptor = b"# Disk DescriptorFile\nRW 2048 FLAT \"/etc/shadow\" 0\n";

        let err = virtual_size(ImageFormat::Vmdk, descriptor, 100).unwrap_err();
        assert!(err.to_string().contains("descriptor-only"), "{err}");
        virtual_size(ImageFormat::Qcow2, b"KDMV", 100).unwrap_err();
        virtual_size(ImageFormat::Raw, b"", 0).unwrap_err();
    }

    #[test]
    fn a_vm_is_named_after_its_file() {
        assert_eq!(stem("/tmp/web.disk.vmdk"), "web.disk");
        assert_eq!(stem("tiny"), "tiny");
    }
}
