//! `pvctl vm-import`: an OVA archive or a bare disk image streamed to the pair, which
//! creates a stopped VM from it (or refuses it, keeping nothing). What the file is comes
//! from `--format` or its extension, and is always stated: the pair never guesses a disk
//! image's format.

use std::path::Path;

use anyhow::bail;
use proto::v1 as pb;

use crate::client;
use crate::upload::Source;

/// What the admin changes from the file's description.
#[derive(Debug, Default)]
pub struct Overrides {
    /// The VM's name.
    pub name: Option<String>,
    /// Protection mode.
    pub mode: Option<pb::ProtectionMode>,
    /// Virtual CPUs.
    pub vcpus: Option<u32>,
    /// Memory in MiB.
    pub memory_mib: Option<u64>,
    /// Storage group of the disks.
    pub storage_group: Option<String>,
    /// Format of the volumes.
    pub disk_format: Option<pb::DiskFormat>,
    /// Networks, replacing the file's.
    pub networks: Vec<String>,
    /// Boot source, replacing the file's.
    pub boot: Option<pb::import_vm_header::Boot>,
}

/// The format named `name` (ova, raw, qcow2, vmdk).
pub fn format_named(name: &str) -> anyhow::Result<pb::ImportFormat> {
    Ok(match name.to_ascii_lowercase().as_str() {
        "ova" => pb::ImportFormat::Ova,
        "raw" | "img" => pb::ImportFormat::Raw,
        "qcow2" => pb::ImportFormat::Qcow2,
        "vmdk" => pb::ImportFormat::Vmdk,
        other => bail!("unknown format {other:?}: use ova, raw, qcow2 or vmdk"),
    })
}

/// The format of `path` by its extension.
fn format_of(path: &Path) -> anyhow::Result<pb::ImportFormat> {
    let Some(extension) = path.extension().map(|e| e.to_string_lossy().into_owned()) else {
        bail!(
            "{} has no extension to tell its format by; give --format ova|raw|qcow2|vmdk",
            path.display()
        );
    };
    format_named(&extension).map_err(|_| {
        anyhow::anyhow!(
            "{} is not named .ova, .raw, .img, .qcow2 or .vmdk; give --format",
            path.display()
        )
    })
}

/// Imports `path` (of `format`, or as its extension says) with `overrides`; the new VM.
pub async fn import(
    endpoints: &client::Endpoints,
    path: &Path,
    format: Option<pb::ImportFormat>,
    overrides: Overrides,
) -> anyhow::Result<pb::Vm> {
    let format = match format {
        Some(format) => format,
        None => format_of(path)?,
    };
    let source = Source::open(path)?;
    let header = pb::ImportVmHeader {
        file_name: source.file_name().unwrap_or_default(),
        size_bytes: source.size_bytes,
        format: format.into(),
        name: overrides.name.unwrap_or_default(),
        mode: overrides.mode.map_or(0, Into::into),
        vcpus: overrides.vcpus.unwrap_or(0),
        memory_mib: overrides.memory_mib.unwrap_or(0),
        storage_group: overrides.storage_group.unwrap_or_default(),
        disk_format: overrides.disk_format.map_or(0, Into::into),
        networks: overrides.networks,
        boot: overrides.boot,
    };
    let (parts, reader) = source
        .stream(
            pb::ImportVmRequest {
                part: Some(pb::import_vm_request::Part::Header(header)),
            },
            |data| pb::ImportVmRequest {
                part: Some(pb::import_vm_request::Part::Data(data)),
            },
            |sha256| pb::ImportVmRequest {
                part: Some(pb::import_vm_request::Part::Sha256(sha256)),
            },
        )
        .await?;
    let mut client = client::connect(endpoints).await?;
    let imported = client.import_vm(parts).await;
    let read = reader.finish().await;
    let vm = imported?.into_inner();
    // A read error makes the pair refuse the short file; the read error says why.
    read?;
    Ok(vm)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_come_from_the_extension_or_are_asked_for() {
        assert_eq!(
            format_of(Path::new("/b/web.ova")).unwrap(),
            pb::ImportFormat::Ova
        );
        assert_eq!(
            format_of(Path::new("disk.QCOW2")).unwrap(),
            pb::ImportFormat::Qcow2
        );
        assert_eq!(
            format_of(Path::new("disk.img")).unwrap(),
            pb::ImportFormat::Raw
        );
        let err = format_of(Path::new("disk")).unwrap_err().to_string();
        assert!(err.contains("--format"), "{err}");
        format_of(Path::new("disk.iso")).unwrap_err();
    }
}
