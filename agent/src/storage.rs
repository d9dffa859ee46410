//! Storage groups: directories of volume files, created and deleted with `qemu-img`.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs;
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use tokio::process::Command;

use crate::domain::DiskFormat;

const QCOW2_MAGIC: &[u8; 4] = b"QFI\xfb";

/// Errors from volume operations.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `qemu-img create` failed.
    #[error("qemu-img could not create {path}: {stderr}")]
    Create {
        /// The volume file.
        path: PathBuf,
        /// qemu-img's error output.
        stderr: String,
    },
    /// A file operation on a volume or storage group failed.
    #[error("{op} {path}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The volume name could escape the storage group or is otherwise unusable.
    #[error(
        "invalid volume name {name:?}: use 1-128 letters, digits, '.', '_' or '-', not starting with '.'"
    )]
    InvalidName {
        /// The name.
        name: String,
    },
    /// The size is zero or not a multiple of 512 bytes.
    #[error("invalid volume size {size_bytes}: must be a positive multiple of 512 bytes")]
    InvalidSize {
        /// The size.
        size_bytes: u64,
    },
    /// A volume of that name exists with another size or format.
    #[error("volume {path} already exists as {format} of {size_bytes} bytes")]
    Exists {
        /// The volume file.
        path: PathBuf,
        /// Its size.
        size_bytes: u64,
        /// Its format.
        format: &'static str,
    },
    /// No storage group of that name is configured on this host.
    #[error("storage group {name} is not configured on this host (known: {known})")]
    UnknownGroup {
        /// The name.
        name: String,
        /// The configured groups.
        known: String,
    },
}

/// A volume file in a storage group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Volume {
    /// Storage group.
    pub group: String,
    /// Volume name (its file name).
    pub name: String,
    /// File path.
    pub path: PathBuf,
    /// Virtual size.
    pub size_bytes: u64,
    /// Format.
    pub format: DiskFormat,
}

/// Capacity of one storage group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupFacts {
    /// Group name.
    pub name: String,
    /// Directory.
    pub path: PathBuf,
    /// Size of the file system holding it.
    pub total_bytes: u64,
    /// Space available to new volumes.
    pub free_bytes: u64,
}

/// This host's storage groups.
#[derive(Clone, Debug)]
pub struct StorageGroups {
    groups: BTreeMap<String, PathBuf>,
}

impl StorageGroups {
    /// Opens the configured groups, creating their directories.
    pub fn open(groups: BTreeMap<String, PathBuf>) -> Result<StorageGroups, Error> {
        for dir in groups.values() {
            fs::create_dir_all(dir).map_err(io_err("creating storage group", dir))?;
        }
        Ok(StorageGroups { groups })
    }

    /// Path of volume `name` in `group`, after checking both.
    pub fn volume_path(&self, group: &str, name: &str) -> Result<PathBuf, Error> {
        let dir = self.group_dir(group)?;
        check_name(name)?;
        Ok(dir.join(name))
    }

    /// The directory of `group`.
    pub fn group_dir(&self, group: &str) -> Result<&Path, Error> {
        self.groups
            .get(group)
            .map(PathBuf::as_path)
            .ok_or_else(|| Error::UnknownGroup {
                name: group.to_string(),
                known: self.groups.keys().cloned().collect::<Vec<_>>().join(", "),
            })
    }

    /// Every group's directory.
    pub fn dirs(&self) -> impl Iterator<Item = &Path> {
        self.groups.values().map(PathBuf::as_path)
    }

    /// Creates a volume; an existing one of the same size and format is returned as it is.
    pub async fn create(
        &self,
        group: &str,
        name: &str,
        size_bytes: u64,
        format: DiskFormat,
    ) -> Result<Volume, Error> {
        if size_bytes == 0 || !size_bytes.is_multiple_of(512) {
            return Err(Error::InvalidSize { size_bytes });
        }
        let path = self.volume_path(group, name)?;
        let volume = Volume {
            group: group.to_string(),
            name: name.to_string(),
            path: path.clone(),
            size_bytes,
            format,
        };
        if path.exists() {
            let (found_format, found_size) = probe(&path, format)?;
            if (found_format, found_size) == (format, size_bytes) {
                return Ok(volume);
            }
            return Err(Error::Exists {
                path,
                size_bytes: found_size,
                format: found_format.as_str(),
            });
        }
        // Build under a temporary name so a crash never leaves a half-made volume in place.
        let tmp = path.with_extension("creating");
        let output = Command::new("qemu-img")
            .args(["create", "-q", "-f", format.as_str()])
            .arg(&tmp)
            .arg(size_bytes.to_string())
            .output()
            .await
            .map_err(io_err("running qemu-img for", &tmp))?;
        if !output.status.success() {
            let _ = fs::remove_file(&tmp);
            return Err(Error::Create {
                path,
                stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
            });
        }
        daemon::fsutil::sync_rename(&tmp, &path)
            .map_err(io_err("syncing the new volume into place", &path))?;
        Ok(volume)
    }

    /// Deletes a volume and its snapshot chain; a missing one is not an error.
    pub fn delete(&self, group: &str, name: &str) -> Result<(), Error> {
        let path = self.volume_path(group, name)?;
        let snapshots = self
            .group_dir(group)?
            .join(crate::snapshot::chain::DIR)
            .join(name);
        match fs::remove_dir_all(&snapshots) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(io_err("deleting the snapshots of volume", &snapshots)(e));
            }
            _ => {}
        }
        match fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                Err(io_err("deleting volume", &path)(e))
            }
            _ => Ok(()),
        }
    }

    /// Capacity of every group.
    pub fn facts(&self) -> Result<Vec<GroupFacts>, Error> {
        self.groups
            .iter()
            .map(|(name, path)| {
                let (total_bytes, free_bytes) =
                    fs_space(path).map_err(io_err("reading free space of", path))?;
                Ok(GroupFacts {
                    name: name.clone(),
                    path: path.clone(),
                    total_bytes,
                    free_bytes,
                })
            })
            .collect()
    }
}

/// Removes every file in directory `dir` of each group: the temporary files of work (exports,
/// A temporary file, removed when dropped: an export's converted disk, an import's image.
#[derive(Debug)]
pub struct Scratch(PathBuf);

impl Scratch {
    /// Takes charge of the file at `path` (it need not exist yet).
    pub fn new(path: PathBuf) -> Scratch {
        Scratch(path)
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

/// imports) an earlier agent did not finish, logged as `what`.
pub fn sweep(groups: &StorageGroups, dir: &str, what: &str) {
    for dir in groups.dirs().map(|d| d.join(dir)) {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            match fs::remove_file(&path) {
                Ok(()) => tracing::info!(path = %path.display(), "removed {what}"),
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "could not remove {what}")
                }
            }
        }
    }
}

/// A storage group `sg0` in a temporary directory, for tests.
#[cfg(test)]
pub(crate) fn test_group() -> (tempfile::TempDir, StorageGroups) {
    let dir = tempfile::tempdir().expect("temp dir");
    let groups = StorageGroups::open(BTreeMap::from([(
        "sg0".to_string(),
        dir.path().to_path_buf(),
    )]))
    .expect("groups");
    (dir, groups)
}

/// Checks that a volume (or ISO) name is a plain, safe file name.
pub(crate) fn check_name(name: &str) -> Result<(), Error> {
    let valid = (1..=128).contains(&name.len())
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if valid {
        Ok(())
    } else {
        Err(Error::InvalidName {
            name: name.to_string(),
        })
    }
}

/// Format and virtual size of an existing volume file meant to be in `format`. A raw volume
/// is never read for a header: its first bytes are the guest's (or an imported image's), and
/// may look like anything.
fn probe(path: &Path, format: DiskFormat) -> Result<(DiskFormat, u64), Error> {
    let mut file = fs::File::open(path).map_err(io_err("opening volume", path))?;
    let mut header = [0u8; 32];
    let read = match format {
        DiskFormat::Qcow2 => file
            .read(&mut header)
            .map_err(io_err("reading volume header of", path))?,
        DiskFormat::Raw => 0,
    };
    if read == header.len() && &header[..4] == QCOW2_MAGIC {
        let mut size = [0u8; 8];
        size.copy_from_slice(&header[24..32]);
        return Ok((DiskFormat::Qcow2, u64::from_be_bytes(size)));
    }
    let len = file
        .metadata()
        .map_err(io_err("reading size of volume", path))?
        .len();
    Ok((DiskFormat::Raw, len))
}

/// Total and available bytes of the file system holding `path`.
#[allow(unsafe_code)]
pub(crate) fn fs_space(path: &Path) -> io::Result<(u64, u64)> {
    let c_path = CString::new(path.as_os_str().as_bytes())?;
    let mut stat = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
    // SAFETY: `c_path` is NUL-terminated and outlives the call; `stat` is writable memory of
    // exactly the type statvfs fills in.
    let rc = unsafe { libc::statvfs(c_path.as_ptr(), stat.as_mut_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: statvfs returned 0, so it initialized every field of `stat`.
    let stat = unsafe { stat.assume_init() };
    Ok((
        stat.f_blocks.saturating_mul(stat.f_frsize),
        stat.f_bavail.saturating_mul(stat.f_frsize),
    ))
}

pub(crate) fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> Error {
    let path = path.to_path_buf();
    move |source| Error::Io { op, path, source }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn groups(dir: &Path) -> StorageGroups {
        StorageGroups::open(BTreeMap::from([("sg0".to_string(), dir.join("sg0"))])).unwrap()
    }

    #[test]
    fn volume_path_with_slash_is_refused() {
        let dir = tempfile::tempdir().unwrap();

        let err = groups(dir.path()).volume_path("sg0", "../etc").unwrap_err();

        assert!(matches!(err, Error::InvalidName { .. }));
    }

    #[test]
    fn volume_path_unknown_group_lists_known_groups() {
        let dir = tempfile::tempdir().unwrap();

        let err = groups(dir.path()).volume_path("fast", "a.raw").unwrap_err();

        assert_eq!(
            err.to_string(),
            "storage group fast is not configured on this host (known: sg0)"
        );
    }

    #[test]
    fn probe_qcow2_header_reads_virtual_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.qcow2");
        let mut header = vec![0u8; 64];
        header[..4].copy_from_slice(QCOW2_MAGIC);
        header[24..32].copy_from_slice(&(1u64 << 30).to_be_bytes());
        fs::write(&path, header).unwrap();

        let found = probe(&path, DiskFormat::Qcow2).unwrap();

        assert_eq!(found, (DiskFormat::Qcow2, 1 << 30));
    }

    #[test]
    fn a_raw_volume_that_starts_like_a_qcow2_is_still_raw() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.raw");
        let mut data = vec![0u8; 4096];
        data[..4].copy_from_slice(QCOW2_MAGIC);
        data[24..32].copy_from_slice(&(1u64 << 30).to_be_bytes());
        fs::write(&path, data).unwrap();

        let found = probe(&path, DiskFormat::Raw).unwrap();

        assert_eq!(found, (DiskFormat::Raw, 4096));
    }

    #[test]
    fn fs_space_of_temp_dir_reports_free_at_most_total() {
        let dir = tempfile::tempdir().unwrap();

        let (total, free) = fs_space(dir.path()).unwrap();

        assert!(free <= total);
    }
}
