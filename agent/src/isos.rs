//! The host's ISO library: installation media kept in each storage group's `.isos` directory
//! and attached to VMs by name only, so a guest is never given an arbitrary host file.
//!
//! An upload arrives as an [`Upload`] into `.isos/` (its temporary name starts with '.', which
//! no ISO's can): a crash or a broken upload never leaves a partial ISO under its name.
//! Leftover temporary files are swept when the agent starts, when no upload can be running.

use std::fs;
use std::io;
use std::path::PathBuf;

use crate::storage::{self, StorageGroups, io_err};
use crate::upload::{self, UPLOADING, Upload};

/// The directory of a storage group that holds its ISOs.
const DIR: &str = ".isos";

/// Errors of the ISO library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The group or name is unusable.
    #[error(transparent)]
    Storage(#[from] storage::Error),
    /// The ISO is not in this host's library.
    #[error("ISO {name} is not in storage group {group} on this host")]
    Missing {
        /// Storage group.
        group: String,
        /// ISO name.
        name: String,
    },
    /// The upload itself failed: its size, checksum or file system.
    #[error("ISO upload: {0}")]
    Upload(#[from] upload::Error),
}

/// The path of ISO `name` in `group`, which must exist.
pub fn find(groups: &StorageGroups, group: &str, name: &str) -> Result<PathBuf, Error> {
    let path = path(groups, group, name)?;
    if path.is_file() {
        Ok(path)
    } else {
        Err(Error::Missing {
            group: group.to_string(),
            name: name.to_string(),
        })
    }
}

/// Deletes ISO `name` from `group`; a missing one is not an error.
pub fn delete(groups: &StorageGroups, group: &str, name: &str) -> Result<(), Error> {
    let path = path(groups, group, name)?;
    match fs::remove_file(&path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            Err(io_err("deleting ISO", &path)(e).into())
        }
        _ => Ok(()),
    }
}

/// Removes the temporary files of uploads an earlier agent did not finish.
pub fn sweep(groups: &StorageGroups) {
    for dir in groups.dirs() {
        let Ok(entries) = fs::read_dir(dir.join(DIR)) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            // Only temporary names: an ISO's name never starts with '.'.
            if name.starts_with('.') && name.ends_with(UPLOADING) {
                let path = entry.path();
                match fs::remove_file(&path) {
                    Ok(()) => {
                        tracing::info!(path = %path.display(), "removed an unfinished ISO upload");
                    }
                    Err(e) => {
                        tracing::warn!(path = %path.display(), error = %e, "could not remove an unfinished ISO upload");
                    }
                }
            }
        }
    }
}

fn path(groups: &StorageGroups, group: &str, name: &str) -> Result<PathBuf, Error> {
    let dir = groups.group_dir(group)?;
    storage::check_name(name)?;
    Ok(dir.join(DIR).join(name))
}

/// Starts the upload of ISO `name` of `size_bytes` into `group`, refusing it up front if the
/// group's file system lacks the room.
pub fn begin(
    groups: &StorageGroups,
    group: &str,
    name: &str,
    size_bytes: u64,
) -> Result<Upload, Error> {
    Ok(Upload::begin(
        group,
        path(groups, group, name)?,
        size_bytes,
    )?)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::path::Path;

    use sha2::{Digest, Sha256};

    use super::*;

    fn groups(dir: &Path) -> StorageGroups {
        StorageGroups::open(BTreeMap::from([("sg0".to_string(), dir.join("sg0"))])).unwrap()
    }

    fn sha(data: &[u8]) -> String {
        format!("{:x}", Sha256::digest(data))
    }

    #[test]
    fn finished_upload_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let groups = groups(dir.path());
        let mut upload = begin(&groups, "sg0", "abc.iso", 3).unwrap();
        upload.write(b"abc").unwrap();

        let iso = upload.finish(&sha(b"abc")).unwrap();

        assert_eq!(find(&groups, "sg0", "abc.iso").unwrap(), iso.path);
        assert_eq!(fs::read_dir(iso.path.parent().unwrap()).unwrap().count(), 1);
    }

    #[test]
    fn unfinished_upload_is_not_found_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let groups = groups(dir.path());
        let mut upload = begin(&groups, "sg0", "a.iso", 4).unwrap();
        upload.write(b"abc").unwrap();

        let err = upload.finish("x").unwrap_err();

        assert!(matches!(err, upload::Error::Size { .. }), "{err}");
        assert!(matches!(
            find(&groups, "sg0", "a.iso"),
            Err(Error::Missing { .. })
        ));
        let isos = dir.path().join("sg0").join(DIR);
        assert_eq!(fs::read_dir(isos).unwrap().count(), 0);
    }

    #[test]
    fn an_iso_named_like_a_temporary_file_survives_the_sweep() {
        let dir = tempfile::tempdir().unwrap();
        let groups = groups(dir.path());
        let mut upload = begin(&groups, "sg0", "install.uploading", 1).unwrap();
        upload.write(b"x").unwrap();
        upload.finish(&sha(b"x")).unwrap();

        sweep(&groups);

        find(&groups, "sg0", "install.uploading").unwrap();
    }

    #[test]
    fn names_that_could_escape_the_library_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let groups = groups(dir.path());

        for name in ["../x", "/etc/passwd", ".hidden", ""] {
            let err = find(&groups, "sg0", name).unwrap_err();
            assert!(
                matches!(err, Error::Storage(storage::Error::InvalidName { .. })),
                "{name}: {err}"
            );
        }
    }

    #[test]
    fn sweep_removes_unfinished_uploads_only() {
        let dir = tempfile::tempdir().unwrap();
        let groups = groups(dir.path());
        let mut done = begin(&groups, "sg0", "done.iso", 1).unwrap();
        done.write(b"x").unwrap();
        done.finish(&sha(b"x")).unwrap();
        let left = begin(&groups, "sg0", "left.iso", 1).unwrap();
        // An agent that died mid-upload leaves its temporary file behind.
        std::mem::forget(left);

        sweep(&groups);

        let names: Vec<String> = fs::read_dir(dir.path().join("sg0").join(DIR))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["done.iso"]);
    }

    #[test]
    fn delete_of_a_missing_iso_is_fine() {
        let dir = tempfile::tempdir().unwrap();

        delete(&groups(dir.path()), "sg0", "none.iso").unwrap();
    }
}
