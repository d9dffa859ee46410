//! A volume, or one of its snapshots, converted for an export: a stream-optimized VMDK, the
//! disk format every OVA consumer reads (compressed, written front to back), by [`vmdk`].
//!
//! The archive's header needs the file's size before its bytes, so the VMDK is written to a
//! temporary file in the volume's storage group first (`.exports/`, after a space check),
//! which the caller streams and which is removed when its [`Converted`] is dropped: when the
//! stream ends, fails or its reader goes away. A qcow2 source (a snapshot generation, which
//! reads through its chain) is first flattened by `qemu-img convert` into a sparse raw file
//! there too, removed once the VMDK is written. The agent removes any left by a crash at start.

use std::path::{Path, PathBuf};

pub mod vmdk;

use crate::qemu_img;
use crate::snapshot::{self, SnapVolume};
use crate::storage::{self, Scratch, StorageGroups, fs_space};

/// Where an export's temporary files live, inside a storage group.
pub const DIR: &str = ".exports";
/// Slack over `qemu-img measure`'s qcow2 estimate of the data: a VMDK of data that does not
/// shrink adds a marker and padding per 64 KiB grain (under 1 %, which the estimate adds),
/// its header, descriptor and two copies of its grain tables (8 KiB per 32 MiB of disk).
const SLACK_BYTES: u64 = 1 << 20;

/// Errors converting a volume for export.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The group or volume name is unusable.
    #[error(transparent)]
    Storage(#[from] storage::Error),
    /// The snapshot's generation is not on this host.
    #[error(transparent)]
    Snapshot(#[from] snapshot::Error),
    /// The volume's file is missing.
    #[error("volume {path} is not on this host")]
    Missing {
        /// Its path.
        path: PathBuf,
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
    /// `qemu-img` failed.
    #[error(transparent)]
    QemuImg(#[from] qemu_img::Failed),
    /// The volume's VM runs: its disk would be read while it changes.
    #[error(
        "domain {uuid} runs; its disks are exported only while it is stopped (or export a snapshot)"
    )]
    Running {
        /// Domain UUID.
        uuid: String,
    },
    /// The converted disk would not fit; nothing was written.
    #[error(
        "exporting needs about {needed} bytes of scratch space in storage group {group} but only {free} are free; free space there"
    )]
    NoSpace {
        /// Storage group.
        group: String,
        /// Bytes needed.
        needed: u64,
        /// Bytes free.
        free: u64,
    },
}

/// A converted disk in its temporary file, removed on drop.
#[derive(Debug)]
pub struct Converted {
    /// The file.
    pub file: Scratch,
    /// Its size in bytes.
    pub size: u64,
}

/// Converts `volume` (or its snapshot `snapshot`) into a temporary stream-optimized VMDK.
/// A volume's VM must be stopped; a snapshot's generation never changes.
pub async fn convert(
    groups: &StorageGroups,
    volume: &SnapVolume,
    snapshot: Option<&str>,
) -> Result<Converted, Error> {
    // The format is always given, never probed: a guest can write what looks like a qcow2
    // header, naming any host file as its backing file, at the start of its raw disk.
    let (source, format) = match snapshot {
        Some(id) => (snapshot::generation(groups, volume, id)?.1, "qcow2"),
        None => (
            groups.volume_path(&volume.group, &volume.name)?,
            volume.format.as_str(),
        ),
    };
    if !source.is_file() {
        return Err(Error::Missing { path: source });
    }
    let dir = groups.group_dir(&volume.group)?.join(DIR);
    std::fs::create_dir_all(&dir).map_err(io_err("creating", &dir))?;
    let data = qemu_img::measure(&source, format, "qcow2", qemu_img::Trust::Own).await?;
    let flatten = format != "raw";
    let tables = volume.size_bytes / (32 << 20) * (8 << 10);
    let needed = data * (1 + u64::from(flatten)) + tables + SLACK_BYTES;
    let free = fs_space(&dir)
        .map_err(io_err("reading free space of", &dir))?
        .1;
    if needed > free {
        return Err(Error::NoSpace {
            group: volume.group.clone(),
            needed,
            free,
        });
    }
    // Unique per export: two exports of one volume may overlap.
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let mut converted = Converted {
        file: Scratch::new(dir.join(format!(".{}.{nonce}.vmdk", volume.name))),
        size: 0,
    };
    let raw = if flatten {
        let raw = Scratch::new(dir.join(format!(".{}.{nonce}.raw", volume.name)));
        let args = [
            "convert".as_ref(),
            "-f".as_ref(),
            format.as_ref(),
            "-O".as_ref(),
            "raw".as_ref(),
            source.as_os_str(),
            raw.path().as_os_str(),
        ];
        qemu_img::run(&args, None).await?;
        Some(raw)
    } else {
        None
    };
    let read = raw.as_ref().map_or(source.as_path(), Scratch::path);
    let input = std::fs::File::open(read).map_err(io_err("opening", read))?;
    let output = std::fs::File::create_new(converted.file.path())
        .map_err(io_err("creating", converted.file.path()))?;
    let capacity = input
        .metadata()
        .map_err(io_err("reading the size of", read))?
        .len()
        .next_multiple_of(512);
    let name = converted
        .file
        .path()
        .file_name()
        .map(|n| n.to_string_lossy().trim_start_matches('.').to_string())
        .unwrap_or_default();
    let out_path = converted.file.path().to_path_buf();
    let written =
        tokio::task::spawn_blocking(move || vmdk::write(&input, capacity, &output, &name))
            .await
            .map_err(|e| Error::Io {
                op: "writing",
                path: out_path.clone(),
                source: std::io::Error::other(e),
            })?
            .map_err(io_err("writing", &out_path))?;
    converted.size = written.bytes;
    tracing::debug!(volume = %volume.name, grains = written.grains, stored = written.stored, bytes = written.bytes, "export volume converted");
    Ok(converted)
}

/// Removes temporary files an earlier agent left in every group's export directory.
pub fn sweep(groups: &StorageGroups) {
    storage::sweep(groups, DIR, "an export's leftover temporary file");
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.to_path_buf();
    move |source| Error::Io { op, path, source }
}

#[cfg(test)]
mod tests {

    use super::*;
    use crate::domain::DiskFormat;

    fn volume(name: &str) -> SnapVolume {
        SnapVolume {
            group: "sg0".into(),
            name: name.into(),
            format: DiskFormat::Raw,
            size_bytes: 4 << 20,
        }
    }

    /// The raw bytes of a converted disk.
    async fn read_back(converted: &Converted, dir: &Path) -> Vec<u8> {
        let back = dir.join("back.raw");
        let args = ["convert", "-O", "raw"].map(std::ffi::OsStr::new);
        let mut all: Vec<&std::ffi::OsStr> = args.to_vec();
        all.extend([converted.file.path().as_os_str(), back.as_os_str()]);
        qemu_img::run(&all, None).await.expect("converted back");
        std::fs::read(&back).expect("read back")
    }

    #[tokio::test]
    async fn a_raw_volume_converts_to_a_vmdk_with_the_same_contents() {
        let (dir, groups) = storage::test_group();
        let raw = dir.path().join("d.raw");
        let mut data = vec![0u8; 4 << 20];
        data[1 << 20..(1 << 20) + 11].copy_from_slice(b"COUNTER 42\n");
        std::fs::write(&raw, &data).expect("volume");

        let converted = convert(&groups, &volume("d.raw"), None)
            .await
            .expect("converted");

        assert_eq!(read_back(&converted, dir.path()).await, data);
        assert!(converted.size > 0 && converted.size < 1 << 20);
        let temp = converted.file.path().to_path_buf();
        drop(converted);
        assert!(!temp.exists(), "the temporary file stays after drop");
    }

    #[tokio::test]
    async fn a_raw_volume_that_looks_like_qcow2_is_exported_as_its_raw_bytes() {
        let (dir, groups) = storage::test_group();
        let fake = dir.path().join("fake.qcow2");
        let args = [
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "/etc/hostname",
            "-F",
            "raw",
        ];
        let mut all: Vec<&std::ffi::OsStr> = args.map(std::ffi::OsStr::new).to_vec();
        let size = std::ffi::OsString::from("4M");
        all.extend([fake.as_os_str(), size.as_os_str()]);
        qemu_img::run(&all, None).await.expect("a qcow2 header");
        let mut data = std::fs::read(&fake).expect("header bytes");
        data.resize(4 << 20, 0);
        std::fs::write(dir.path().join("d.raw"), &data).expect("a raw volume");

        let converted = convert(&groups, &volume("d.raw"), None)
            .await
            .expect("converted");

        assert_eq!(read_back(&converted, dir.path()).await, data);
    }

    #[tokio::test]
    async fn a_missing_volume_is_refused() {
        let (_dir, groups) = storage::test_group();

        let refused = convert(&groups, &volume("none.raw"), None).await;

        assert!(matches!(refused, Err(Error::Missing { .. })), "{refused:?}");
    }

    #[test]
    fn sweep_removes_leftovers() {
        let (dir, groups) = storage::test_group();
        let exports = dir.path().join(DIR);
        std::fs::create_dir_all(&exports).expect("dir");
        std::fs::write(exports.join(".d.raw.1.vmdk"), b"x").expect("leftover");

        sweep(&groups);

        assert_eq!(std::fs::read_dir(&exports).expect("dir").count(), 0);
    }
}
