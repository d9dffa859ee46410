//! A disk image imported into a new volume: received whole into the storage group's
//! `.imports/` directory ([`receive`]), then, once the controller commits its verified
//! SHA-256, checked and converted into the volume ([`install`]).
//!
//! An imported image is untrusted input. Its format is always the one stated (never
//! probed), and before anything reads it as an image, `qemu-img info` must show it
//! self-contained: no backing file, no external data file, no extent in another file. A
//! VMDK descriptor or qcow2 header can otherwise name any host file, whose bytes the
//! conversion would copy into the guest's disk. The volume is built under a temporary name
//! and renamed into place last; everything in `.imports/` is swept when the agent starts.

use std::path::{Path, PathBuf};

use crate::domain::DiskFormat;
use crate::qemu_img::{self, Trust};
use crate::storage::{self, Scratch, StorageGroups, fs_space, io_err};
use crate::upload::{self, Upload};

/// Where imports' temporary files live, inside a storage group.
pub const DIR: &str = ".imports";

/// The format of an image being imported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageFormat {
    /// Raw bytes.
    Raw,
    /// QCOW2.
    Qcow2,
    /// A VMDK with its data in the same file (monolithic sparse or stream-optimized).
    Vmdk,
}

impl ImageFormat {
    /// The name qemu-img uses.
    pub fn as_str(self) -> &'static str {
        match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Qcow2 => "qcow2",
            ImageFormat::Vmdk => "vmdk",
        }
    }
}

/// Errors importing an image.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The group or volume name is unusable.
    #[error(transparent)]
    Storage(#[from] storage::Error),
    /// Receiving the image failed.
    #[error("receiving the image: {0}")]
    Upload(#[from] upload::Error),
    /// `qemu-img` failed: the image is not of its stated format, or damaged.
    #[error("the image is not a readable {format} image")]
    Unreadable {
        /// The stated format.
        format: &'static str,
        /// qemu-img's failure.
        #[source]
        source: qemu_img::Failed,
    },
    /// Converting or growing the image failed.
    #[error(transparent)]
    QemuImg(#[from] qemu_img::Failed),
    /// The image refers to other files.
    #[error("the image refers to another file ({what}); only self-contained images are imported")]
    NotSelfContained {
        /// What it refers to.
        what: String,
    },
    /// The image is larger than the disk made for it.
    #[error("the image's virtual size of {image_bytes} bytes exceeds the disk's {size_bytes}")]
    TooLarge {
        /// The image's virtual size.
        image_bytes: u64,
        /// The volume's size.
        size_bytes: u64,
    },
    /// The controller that asked no longer serves: its successor rolls the import back.
    #[error("another controller took over during the import; the volume was not kept")]
    Superseded,
    /// The volume exists: an import only creates.
    #[error("volume {path} already exists; an import never overwrites a volume")]
    Exists {
        /// The volume file.
        path: PathBuf,
    },
    /// The converted volume would not fit; nothing was written.
    #[error(
        "the volume needs about {needed} bytes in storage group {group} but only {free} are free; free space there"
    )]
    NoSpace {
        /// Storage group.
        group: String,
        /// Bytes needed.
        needed: u64,
        /// Bytes free.
        free: u64,
    },
    /// A file operation failed.
    #[error("{op} {path}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// The volume an import fills.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// Storage group.
    pub group: String,
    /// Volume name.
    pub name: String,
    /// Its format.
    pub format: DiskFormat,
    /// Its size: the VM's disk size.
    pub size_bytes: u64,
}

/// A received image in `.imports/`, removed on drop.
#[derive(Debug)]
pub struct Image {
    /// The file.
    pub file: Scratch,
    /// Its format.
    pub format: ImageFormat,
}

/// Starts receiving the `source_bytes` of the image for `target`, refusing up front a
/// volume that exists or an image that does not fit.
pub fn receive(
    groups: &StorageGroups,
    target: &Target,
    source_bytes: u64,
) -> Result<Upload, Error> {
    let volume = groups.volume_path(&target.group, &target.name)?;
    if volume.exists() {
        return Err(Error::Exists { path: volume });
    }
    let dir = groups.group_dir(&target.group)?.join(DIR);
    Ok(Upload::begin(
        &target.group,
        dir.join(format!("{}.image", target.name)),
        source_bytes,
    )?
    .scratch())
}

/// Commits `upload` with its verified `sha256`: the received image, as a guard that removes
/// it, made on the writing thread so that a caller gone meanwhile still has it removed.
pub async fn commit(upload: Upload, sha256: String, format: ImageFormat) -> Result<Image, Error> {
    Ok(upload
        .commit(sha256, move |received| Image {
            file: Scratch::new(received.path),
            format,
        })
        .await?)
}

/// Checks the received `image` and converts it into `target`, grown to its size; returns
/// the image's virtual size. `still_asked` is asked last, just before the volume is renamed
/// into place: a controller that took over meanwhile deletes what it finds, so a volume
/// renamed after its deletion would be left behind.
pub async fn install(
    groups: &StorageGroups,
    image: &Image,
    target: &Target,
    still_asked: impl FnOnce() -> bool,
) -> Result<u64, Error> {
    let image_bytes = inspect(image).await?;
    if image_bytes > target.size_bytes {
        return Err(Error::TooLarge {
            image_bytes,
            size_bytes: target.size_bytes,
        });
    }
    let volume = groups.volume_path(&target.group, &target.name)?;
    if volume.exists() {
        return Err(Error::Exists { path: volume });
    }
    let dir = groups.group_dir(&target.group)?.join(DIR);
    let to = target.format.as_str();
    let needed = qemu_img::measure(
        image.file.path(),
        image.format.as_str(),
        to,
        Trust::Untrusted,
    )
    .await?;
    let free = fs_space(&dir)
        .map_err(io_err("reading free space of", &dir))?
        .1;
    if needed > free {
        return Err(Error::NoSpace {
            group: target.group.clone(),
            needed,
            free,
        });
    }
    // Removed on drop unless renamed into place.
    let building = Scratch::new(dir.join(format!("{}.building", target.name)));
    let _ = std::fs::remove_file(building.path());
    let args = [
        "convert".as_ref(),
        "-f".as_ref(),
        image.format.as_str().as_ref(),
        "-O".as_ref(),
        to.as_ref(),
        image.file.path().as_os_str(),
        building.path().as_os_str(),
    ];
    qemu_img::run(&args, None).await?;
    if image_bytes < target.size_bytes {
        let size = target.size_bytes.to_string();
        let args = [
            "resize".as_ref(),
            "-q".as_ref(),
            "-f".as_ref(),
            to.as_ref(),
            building.path().as_os_str(),
            size.as_ref(),
        ];
        qemu_img::run(&args, None).await?;
    }
    if !still_asked() {
        return Err(Error::Superseded);
    }
    daemon::fsutil::sync_rename(building.path(), &volume).map_err(|source| Error::Io {
        op: "syncing the imported volume into place",
        path: volume.clone(),
        source,
    })?;
    Ok(image_bytes)
}

/// What `qemu-img info` shows of an image.
#[derive(Debug, serde::Deserialize)]
struct Info {
    #[serde(rename = "virtual-size")]
    virtual_size: u64,
    #[serde(rename = "backing-filename")]
    backing: Option<String>,
    #[serde(default)]
    children: Vec<Child>,
    #[serde(rename = "format-specific")]
    specific: Option<Specific>,
}

#[derive(Debug, serde::Deserialize)]
struct Child {
    name: String,
}

#[derive(Debug, serde::Deserialize)]
struct Specific {
    #[serde(default)]
    data: SpecificData,
}

#[derive(Debug, Default, serde::Deserialize)]
struct SpecificData {
    #[serde(rename = "data-file")]
    data_file: Option<String>,
    #[serde(default)]
    extents: Vec<Extent>,
}

#[derive(Debug, serde::Deserialize)]
struct Extent {
    filename: String,
}

/// The image's virtual size, once `qemu-img info` shows it is of its stated format and
/// self-contained.
async fn inspect(image: &Image) -> Result<u64, Error> {
    let format = image.format.as_str();
    let args = [
        "info".as_ref(),
        "--output=json".as_ref(),
        "-f".as_ref(),
        format.as_ref(),
        image.file.path().as_os_str(),
    ];
    let info: Info = qemu_img::json(&args, Trust::Untrusted)
        .await
        .map_err(|source| Error::Unreadable { format, source })?;
    self_contained(&info, image.file.path())?;
    Ok(info.virtual_size)
}

fn self_contained(info: &Info, path: &Path) -> Result<(), Error> {
    let refused = |what: String| Err(Error::NotSelfContained { what });
    if let Some(backing) = &info.backing {
        return refused(format!("backing file {backing}"));
    }
    if let Some(child) = info.children.iter().find(|c| c.name != "file") {
        return refused(format!("{} child", child.name));
    }
    let data = info.specific.as_ref().map(|s| &s.data);
    if let Some(file) = data.and_then(|d| d.data_file.as_ref()) {
        return refused(format!("data file {file}"));
    }
    let own = path.to_string_lossy();
    if let Some(extent) = data
        .into_iter()
        .flat_map(|d| &d.extents)
        .find(|e| e.filename != own)
    {
        return refused(format!("extent {}", extent.filename));
    }
    Ok(())
}

/// Removes what imports an earlier agent did not finish left in every group.
pub fn sweep(groups: &StorageGroups) {
    storage::sweep(groups, DIR, "an unfinished import's file");
}

#[cfg(test)]
mod tests {

    use sha2::{Digest, Sha256};

    use super::*;

    fn target(name: &str, format: DiskFormat, size_bytes: u64) -> Target {
        Target {
            group: "sg0".into(),
            name: name.into(),
            format,
            size_bytes,
        }
    }

    fn qemu_img(args: &[&str]) {
        let status = std::process::Command::new("qemu-img")
            .args(args)
            .status()
            .expect("qemu-img runs");
        assert!(status.success(), "qemu-img {args:?}");
    }

    /// Receives the file at `path` as the image of `target`, as the service does.
    fn received(
        groups: &StorageGroups,
        target: &Target,
        path: &Path,
        format: ImageFormat,
    ) -> Image {
        let bytes = std::fs::read(path).unwrap();
        let mut upload = receive(groups, target, bytes.len() as u64).unwrap();
        upload.write(&bytes).unwrap();
        let sha = format!("{:x}", Sha256::digest(&bytes));
        Image {
            file: Scratch::new(upload.finish(&sha).unwrap().path),
            format,
        }
    }

    fn leftovers(dir: &Path) -> Vec<String> {
        std::fs::read_dir(dir.join(DIR))
            .map(|e| {
                e.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    #[tokio::test]
    async fn a_vmdk_becomes_a_volume_of_the_disk_size_with_the_same_bytes() {
        let (dir, groups) = storage::test_group();
        let raw = dir.path().join("src.raw");
        let data: Vec<u8> = (0u32..(1 << 20)).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(&raw, &data).unwrap();
        let vmdk = dir.path().join("src.vmdk");
        qemu_img(
            &[
                "convert",
                "-f",
                "raw",
                "-O",
                "vmdk",
                "-o",
                "subformat=streamOptimized",
            ]
            .iter()
            .copied()
            .chain([raw.to_str().unwrap(), vmdk.to_str().unwrap()])
            .collect::<Vec<_>>(),
        );
        let target = target("v.raw", DiskFormat::Raw, 2 << 20);
        let image = received(&groups, &target, &vmdk, ImageFormat::Vmdk);

        let image_bytes = install(&groups, &image, &target, || true).await.unwrap();
        drop(image);

        assert_eq!(image_bytes, 1 << 20);
        let volume = std::fs::read(dir.path().join("v.raw")).unwrap();
        assert_eq!(volume.len(), 2 << 20);
        assert_eq!(&volume[..1 << 20], &data[..]);
        assert!(volume[1 << 20..].iter().all(|b| *b == 0));
        assert!(
            leftovers(dir.path()).is_empty(),
            "{:?}",
            leftovers(dir.path())
        );
    }

    #[tokio::test]
    async fn an_import_superseded_before_its_rename_leaves_no_volume() {
        let (dir, groups) = storage::test_group();
        let raw = dir.path().join("src.raw");
        std::fs::write(&raw, vec![3u8; 65536]).unwrap();
        let target = target("v.raw", DiskFormat::Raw, 1 << 20);
        let image = received(&groups, &target, &raw, ImageFormat::Raw);

        let err = install(&groups, &image, &target, || false)
            .await
            .unwrap_err();
        drop(image);

        assert!(matches!(err, Error::Superseded), "{err}");
        assert!(!dir.path().join("v.raw").exists());
        assert!(
            leftovers(dir.path()).is_empty(),
            "{:?}",
            leftovers(dir.path())
        );
    }

    #[tokio::test]
    async fn a_qcow2_with_a_backing_file_is_refused() {
        let (dir, groups) = storage::test_group();
        let secret = dir.path().join("secret.raw");
        std::fs::write(&secret, vec![7u8; 65536]).unwrap();
        let evil = dir.path().join("evil.qcow2");
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            secret.to_str().unwrap(),
            "-F",
            "raw",
            evil.to_str().unwrap(),
        ]);
        let target = target("v.qcow2", DiskFormat::Qcow2, 1 << 20);
        let image = received(&groups, &target, &evil, ImageFormat::Qcow2);

        let err = install(&groups, &image, &target, || true)
            .await
            .unwrap_err();

        assert!(matches!(err, Error::NotSelfContained { .. }), "{err}");
        assert!(!dir.path().join("v.qcow2").exists());
    }

    #[tokio::test]
    async fn a_qcow2_with_an_external_data_file_is_refused() {
        let (dir, groups) = storage::test_group();
        let secret = dir.path().join("secret.raw");
        std::fs::write(&secret, vec![7u8; 1 << 20]).unwrap();
        let evil = dir.path().join("evil.qcow2");
        let option = format!("data_file={},data_file_raw=on", secret.display());
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &option,
            evil.to_str().unwrap(),
            "1M",
        ]);
        let target = target("v.raw", DiskFormat::Raw, 1 << 20);
        let image = received(&groups, &target, &evil, ImageFormat::Qcow2);

        let err = install(&groups, &image, &target, || true)
            .await
            .unwrap_err();

        assert!(matches!(err, Error::NotSelfContained { .. }), "{err}");
    }

    #[tokio::test]
    async fn a_vmdk_descriptor_naming_a_host_file_is_refused() {
        let (dir, groups) = storage::test_group();
        let descriptor = format!(
            "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\n\nRW 2048 FLAT \"{}\" 0\n",
            dir.path().join("secret.raw").display()
        );
        std::fs::write(dir.path().join("secret.raw"), vec![7u8; 1 << 20]).unwrap();
        let evil = dir.path().join("evil.vmdk");
        std::fs::write(&evil, descriptor).unwrap();
        let target = target("v.raw", DiskFormat::Raw, 1 << 20);
        let image = received(&groups, &target, &evil, ImageFormat::Vmdk);

        let err = install(&groups, &image, &target, || true)
            .await
            .unwrap_err();

        assert!(matches!(err, Error::NotSelfContained { .. }), "{err}");
        assert!(!dir.path().join("v.raw").exists());
    }

    #[tokio::test]
    async fn an_image_of_another_format_is_refused_as_unreadable() {
        let (dir, groups) = storage::test_group();
        let raw = dir.path().join("plain.raw");
        std::fs::write(&raw, vec![1u8; 65536]).unwrap();
        let target = target("v.raw", DiskFormat::Raw, 1 << 20);
        let image = received(&groups, &target, &raw, ImageFormat::Qcow2);

        let err = install(&groups, &image, &target, || true)
            .await
            .unwrap_err();

        assert!(matches!(err, Error::Unreadable { .. }), "{err}");
    }

    #[tokio::test]
    async fn an_image_larger_than_the_disk_is_refused() {
        let (dir, groups) = storage::test_group();
        let raw = dir.path().join("big.raw");
        std::fs::write(&raw, vec![1u8; 2 << 20]).unwrap();
        let target = target("v.raw", DiskFormat::Raw, 1 << 20);
        let image = received(&groups, &target, &raw, ImageFormat::Raw);

        let err = install(&groups, &image, &target, || true)
            .await
            .unwrap_err();

        assert!(matches!(err, Error::TooLarge { .. }), "{err}");
        assert!(!dir.path().join("v.raw").exists());
    }

    #[test]
    fn an_existing_volume_is_never_overwritten() {
        let (dir, groups) = storage::test_group();
        std::fs::write(dir.path().join("v.raw"), b"keep").unwrap();

        let err = receive(&groups, &target("v.raw", DiskFormat::Raw, 1 << 20), 4).unwrap_err();

        assert!(matches!(err, Error::Exists { .. }), "{err}");
        assert_eq!(std::fs::read(dir.path().join("v.raw")).unwrap(), b"keep");
    }

    #[test]
    fn sweep_removes_what_an_import_left() {
        let (dir, groups) = storage::test_group();
        let upload = receive(&groups, &target("v.raw", DiskFormat::Raw, 1 << 20), 4).unwrap();
        std::mem::forget(upload);
        assert_eq!(leftovers(dir.path()).len(), 1);

        sweep(&groups);

        assert!(leftovers(dir.path()).is_empty());
    }
}
