//! Imports: a stopped VM created from an OVA archive or a bare disk image a client streams.
//!
//! ```text
//!  pvctl ─ ImportVm ─► serving controller ──────────── ImportVolume (per disk) ──► agent of
//!   header             reads the OVF (or the image's     header, image bytes        the VM's
//!   bytes              header): the VM's spec            ...                        host
//!   SHA-256            engine: admit, record Creating
//!                      files checked (manifest, SHA) ── commit(SHA-256) ──────────► qemu-img
//!                      engine: define it (Stopped),                                 info, convert
//!                      or roll it back (Deleting)      ◄── volume in place ───────
//! ```
//! The engine decides (placement, the record, the rollback); this module reads the file and
//! carries its disks. Nothing is converted before every byte of the file is verified: an
//! agent keeps an image only on its commit, which comes after the manifest, the file's size
//! and its SHA-256 all match. A failed import's record goes through `Deleting`, which
//! removes whatever a host made, and a controller that dies mid-import leaves a `Creating`
//! record its successor rolls back the same way.

pub mod image;
pub mod ova;

use proto::agent as agent_pb;
use tokio_stream::Stream;

use crate::agents::{self, Agent, Token};
use crate::engine::{Command, EngineHandle};
use crate::error::ApiError;
use crate::feed::Feed;
use crate::incoming::{Incoming, Part};
use crate::model::{Boot, DiskFormat, DiskRequest, Mode, VmRecord, VmSpec};
use crate::ova::read::Appliance;

/// Bytes per message to an agent.
const CHUNK: usize = 1 << 20;
/// The storage group disks go to when the request names none (as `pvctl vm-create`'s).
const DEFAULT_GROUP: &str = "sg0";
/// CPUs, memory and mode of a VM whose file does not say.
const DEFAULT_VCPUS: u32 = 1;
const DEFAULT_MEMORY_MIB: u64 = 256;
const DEFAULT_MODE: Mode = Mode::Ha;

/// What is imported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// An OVA archive.
    Ova,
    /// A bare disk image.
    Image(ImageFormat),
}

/// The format of a disk image, always stated: qemu-img never guesses it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageFormat {
    /// Raw bytes.
    Raw,
    /// QCOW2.
    Qcow2,
    /// VMDK with its data inside (monolithic sparse or stream-optimized).
    Vmdk,
}

/// An import's header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// The file's name, for messages and a bare image's VM name.
    pub file_name: String,
    /// Its size in bytes.
    pub size_bytes: u64,
    /// What it is.
    pub format: Format,
    /// What the admin changes from the file's description.
    pub overrides: Overrides,
}

/// What the admin changes from the file's description; `None` (or empty) keeps it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Overrides {
    /// The VM's name.
    pub name: Option<String>,
    /// Protection mode.
    pub mode: Option<Mode>,
    /// Virtual CPUs.
    pub vcpus: Option<u32>,
    /// Memory in MiB.
    pub memory_mib: Option<u64>,
    /// The storage group of its disks.
    pub storage_group: Option<String>,
    /// The format of its volumes.
    pub disk_format: Option<DiskFormat>,
    /// Its networks, replacing the file's when not empty.
    pub networks: Vec<String>,
    /// Its boot source.
    pub boot: Option<Boot>,
}

/// The spec of the VM `appliance` describes, as `overrides` change it; each disk grows to
/// a whole MiB (volumes are sized in MiB).
pub fn spec(appliance: &Appliance, overrides: &Overrides, file: &str) -> Result<VmSpec, ApiError> {
    if appliance.disks.is_empty() {
        return Err(ApiError::invalid(
            "file",
            format!("{file} describes no disk; nothing to import"),
        ));
    }
    let storage_group = overrides
        .storage_group
        .clone()
        .unwrap_or_else(|| DEFAULT_GROUP.to_string());
    let format = overrides.disk_format.unwrap_or(DiskFormat::Raw);
    let disks = appliance
        .disks
        .iter()
        .map(|d| DiskRequest {
            size_bytes: d.capacity.div_ceil(1 << 20).saturating_mul(1 << 20),
            storage_group: storage_group.clone(),
            format,
        })
        .collect();
    let boot = overrides
        .boot
        .clone()
        .or_else(|| appliance.boot.clone())
        .ok_or_else(|| {
            ApiError::invalid(
                "boot",
                format!("{file} records no boot source; give --kernel-image or --iso"),
            )
        })?;
    Ok(VmSpec {
        name: overrides
            .name
            .clone()
            .unwrap_or_else(|| appliance.name.clone()),
        mode: overrides.mode.or(appliance.mode).unwrap_or(DEFAULT_MODE),
        vcpus: overrides.vcpus.or(appliance.vcpus).unwrap_or(DEFAULT_VCPUS),
        memory_mib: overrides
            .memory_mib
            .or(appliance.memory_mib)
            .unwrap_or(DEFAULT_MEMORY_MIB),
        disks,
        networks: if overrides.networks.is_empty() {
            appliance.networks.clone()
        } else {
            overrides.networks.clone()
        },
        boot,
    })
}

/// An admitted import: the new VM's record (`Creating`, held from every other command), the
/// agent of its host and the token its calls carry.
#[derive(Clone, Debug)]
pub struct Begun {
    /// The record.
    pub record: VmRecord,
    /// The agent of `record.node`.
    pub agent: Agent,
    /// The serving term and the VM's generation.
    pub token: Token,
}

/// Imports the file `header` announces, reading its bytes from `parts`; the stopped VM.
pub async fn run<S>(engine: &EngineHandle, header: Header, parts: S) -> Result<VmRecord, ApiError>
where
    S: Stream<Item = Result<Part, ApiError>> + Unpin + Send + 'static,
{
    let incoming = Incoming::new(parts, header.size_bytes);
    match header.format {
        Format::Ova => ova::run(engine, &header, incoming).await,
        Format::Image(format) => image::run(engine, &header, format, incoming).await,
    }
}

/// Creates the VM of `spec`, lets `fill` fill its disks, then has the engine define it, or
/// roll it back if `fill` failed.
async fn create<F, Fut>(engine: &EngineHandle, spec: VmSpec, fill: F) -> Result<VmRecord, ApiError>
where
    F: FnOnce(Begun) -> Fut,
    Fut: Future<Output = Result<(), ApiError>>,
{
    let begun = engine
        .call(|reply| Command::ImportBegin { spec, reply })
        .await?;
    let uuid = begun.record.uuid.clone();
    let outcome = fill(begun).await;
    let reported = outcome.as_ref().map(|_| ()).map_err(ToString::to_string);
    let record = engine
        .call(|reply| Command::ImportFinish {
            uuid,
            outcome: reported,
            reply,
        })
        .await;
    outcome?;
    record
}

/// The feed of disk `index` of `begun`'s VM: an image of `format` and `bytes` bytes.
fn open_disk(
    begun: &Begun,
    index: usize,
    format: ImageFormat,
    bytes: u64,
) -> Result<Feed<agent_pb::ImportVolumeRequest, agent_pb::ImportedVolume>, ApiError> {
    let volume = agents::replica_volumes(&begun.record)
        .into_iter()
        .nth(index)
        .ok_or_else(|| ApiError::Internal(format!("the VM has no disk {index}")))?;
    let source_format = match format {
        ImageFormat::Raw => agent_pb::ImageFormat::Raw,
        ImageFormat::Qcow2 => agent_pb::ImageFormat::Qcow2,
        ImageFormat::Vmdk => agent_pb::ImageFormat::Vmdk,
    };
    let header = agent_pb::ImportVolumeRequest {
        part: Some(agent_pb::import_volume_request::Part::Header(
            agent_pb::ImportVolumeHeader {
                vm_uuid: begun.record.uuid.clone(),
                volume: Some(volume),
                source_format: source_format.into(),
                source_bytes: bytes,
                fence: agents::fence(begun.token),
            },
        )),
    };
    let agent = begun.agent.clone();
    Ok(Feed::open(
        &begun.record.node,
        "a disk image",
        header,
        move |parts| async move { agent.import_volume(parts).await },
    ))
}

/// Sends `data` on `feed`.
async fn send(
    feed: &mut Feed<agent_pb::ImportVolumeRequest, agent_pb::ImportedVolume>,
    data: Vec<u8>,
) -> Result<(), ApiError> {
    let part = agent_pb::import_volume_request::Part::Data(data);
    feed.send(agent_pb::ImportVolumeRequest { part: Some(part) })
        .await
}

/// Commits disk `index` with its verified `sha256` and checks the volume the agent made.
async fn commit(
    begun: &Begun,
    index: usize,
    feed: Feed<agent_pb::ImportVolumeRequest, agent_pb::ImportedVolume>,
    sha256: String,
) -> Result<(), ApiError> {
    let part = agent_pb::import_volume_request::Part::CommitSha256(sha256);
    let made = feed
        .close(agent_pb::ImportVolumeRequest { part: Some(part) })
        .await?;
    let size = begun.record.disks.get(index).map_or(0, |d| d.size_bytes);
    if made.size_bytes != size {
        return Err(ApiError::Internal(format!(
            "disk {} was made with {} bytes, not the {size} recorded",
            index + 1,
            made.size_bytes
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ova::read::DiskFile;

    fn bare(capacity: u64) -> Appliance {
        Appliance {
            name: "tiny".into(),
            disks: vec![DiskFile {
                href: "tiny.vmdk".into(),
                capacity,
            }],
            ..Appliance::default()
        }
    }

    #[test]
    fn a_bare_image_needs_a_boot_source_and_gets_defaults() {
        let err = spec(&bare(1 << 20), &Overrides::default(), "tiny.vmdk").unwrap_err();
        assert!(err.to_string().contains("--kernel-image"), "{err}");

        let overrides = Overrides {
            boot: Some(Boot::Kernel {
                image: "tiny".into(),
            }),
            ..Overrides::default()
        };
        let spec = spec(&bare((3 << 20) + 1), &overrides, "tiny.vmdk").unwrap();

        assert_eq!(spec.name, "tiny");
        assert_eq!((spec.mode, spec.vcpus, spec.memory_mib), (Mode::Ha, 1, 256));
        assert_eq!(spec.disks[0].size_bytes, 4 << 20, "grown to whole MiB");
        assert_eq!(spec.disks[0].storage_group, "sg0");
    }

    #[test]
    fn overrides_replace_what_the_archive_says() {
        let appliance = Appliance {
            vcpus: Some(1),
            memory_mib: Some(256),
            mode: Some(Mode::Ft),
            networks: vec!["business".into()],
            boot: Some(Boot::Kernel {
                image: "tiny".into(),
            }),
            ..bare(16 << 20)
        };
        let overrides = Overrides {
            name: Some("copy".into()),
            vcpus: Some(2),
            memory_mib: Some(512),
            mode: Some(Mode::Ha),
            storage_group: Some("fast".into()),
            disk_format: Some(DiskFormat::Qcow2),
            ..Overrides::default()
        };

        let spec = spec(&appliance, &overrides, "x.ova").unwrap();

        assert_eq!(
            (spec.name.as_str(), spec.mode, spec.vcpus, spec.memory_mib),
            ("copy", Mode::Ha, 2, 512)
        );
        assert_eq!(spec.networks, ["business"]);
        assert_eq!(spec.disks[0].storage_group, "fast");
        assert_eq!(spec.disks[0].format, DiskFormat::Qcow2);
        assert_eq!(spec.disks[0].size_bytes, 16 << 20);
    }
}
