//! The host's ISO library: installation media kept in each storage group's `.isos` directory
//! and attached to VMs by name only, so a guest is never given an arbitrary host file.
//!
//! An upload is written to `.isos/.NAME.uploading` (a name no ISO can have), checked against
//! the size it announced, synced and renamed into place: a crash or a broken upload never
//! leaves a partial ISO under its name. Leftover temporary files are swept when the agent
//! starts, when no upload can be running.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::storage::{self, StorageGroups, fs_space, io_err};

/// The directory of a storage group that holds its ISOs.
const DIR: &str = ".isos";
/// Suffix of an upload's temporary file.
const UPLOADING: &str = ".uploading";

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
    /// The storage group's file system lacks room for the upload.
    #[error(
        "storage group {group} has {free_bytes} bytes free, too few for an ISO of {size_bytes} bytes"
    )]
    NoSpace {
        /// Storage group.
        group: String,
        /// Space available.
        free_bytes: u64,
        /// The ISO's size.
        size_bytes: u64,
    },
    /// The bytes written do not hash to the checksum committed.
    #[error("the ISO {name} written here hashes to {ours}, not to the committed {theirs}")]
    Checksum {
        /// ISO name.
        name: String,
        /// This host's checksum.
        ours: String,
        /// The one committed.
        theirs: String,
    },
    /// More or fewer bytes arrived than the upload announced.
    #[error("the upload of ISO {name} announced {expected} bytes but {got} arrived")]
    Size {
        /// ISO name.
        name: String,
        /// Bytes announced.
        expected: u64,
        /// Bytes received (so far, when too many).
        got: u64,
    },
}

/// A finished ISO.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IsoFile {
    /// Its path.
    pub path: PathBuf,
    /// Its size.
    pub size_bytes: u64,
    /// Lowercase hex SHA-256 of its bytes.
    pub sha256: String,
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

/// An upload in progress; dropped unfinished, it removes its temporary file.
#[derive(Debug)]
pub struct Upload {
    name: String,
    file: File,
    finished: bool,
    tmp: PathBuf,
    path: PathBuf,
    expected: u64,
    written: u64,
    hasher: Sha256,
}

impl Upload {
    /// Starts the upload of ISO `name` of `size_bytes` into `group`, refusing it up front if
    /// the group's file system lacks the room.
    pub fn begin(
        groups: &StorageGroups,
        group: &str,
        name: &str,
        size_bytes: u64,
    ) -> Result<Upload, Error> {
        let path = path(groups, group, name)?;
        let dir = path.parent().unwrap_or(Path::new("."));
        fs::create_dir_all(dir).map_err(io_err("creating the ISO directory", dir))?;
        let (_, free_bytes) = fs_space(dir).map_err(io_err("reading free space of", dir))?;
        if free_bytes < size_bytes {
            return Err(Error::NoSpace {
                group: group.to_string(),
                free_bytes,
                size_bytes,
            });
        }
        // Unique per upload: a retry of the same name never shares a dying upload's file.
        let nonce = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let tmp = dir.join(format!(".{name}.{nonce}{UPLOADING}"));
        let file = File::options()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(io_err("creating", &tmp))?;
        Ok(Upload {
            name: name.to_string(),
            file,
            finished: false,
            tmp,
            path,
            expected: size_bytes,
            written: 0,
            hasher: Sha256::new(),
        })
    }

    /// Appends `data`; refuses bytes beyond the size announced.
    pub fn write(&mut self, data: &[u8]) -> Result<(), Error> {
        let got = self.written.saturating_add(data.len() as u64);
        if got > self.expected {
            return Err(self.size_error(got));
        }
        self.file
            .write_all(data)
            .map_err(io_err("writing", &self.tmp))?;
        self.hasher.update(data);
        self.written = got;
        Ok(())
    }

    /// Checks the size and that the bytes hash to `sha256` (the checksum the uploader and
    /// the controller verified), then syncs the file and renames it into place.
    pub fn finish(mut self, sha256: &str) -> Result<IsoFile, Error> {
        if self.written != self.expected {
            return Err(self.size_error(self.written));
        }
        let ours = format!("{:x}", std::mem::take(&mut self.hasher).finalize());
        if ours != sha256 {
            return Err(Error::Checksum {
                name: self.name.clone(),
                ours,
                theirs: sha256.to_string(),
            });
        }
        daemon::fsutil::sync_rename(&self.tmp, &self.path)
            .map_err(io_err("syncing the ISO into place", &self.path))?;
        self.finished = true;
        Ok(IsoFile {
            path: self.path.clone(),
            size_bytes: self.written,
            sha256: sha256.to_string(),
        })
    }

    fn size_error(&self, got: u64) -> Error {
        Error::Size {
            name: self.name.clone(),
            expected: self.expected,
            got,
        }
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        // A finished upload's temporary file is the ISO itself, renamed.
        if !self.finished {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn groups(dir: &Path) -> StorageGroups {
        StorageGroups::open(BTreeMap::from([("sg0".to_string(), dir.join("sg0"))])).unwrap()
    }

    #[test]
    fn finished_upload_is_found_with_its_sha256() {
        let dir = tempfile::tempdir().unwrap();
        let groups = groups(dir.path());
        let mut upload = Upload::begin(&groups, "sg0", "abc.iso", 3).unwrap();
        upload.write(b"ab").unwrap();
        upload.write(b"c").unwrap();

        // SHA-256("abc") from FIPS 180-2's examples.
        let iso = upload
            .finish("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
            .unwrap();

        assert_eq!(find(&groups, "sg0", "abc.iso").unwrap(), iso.path);
        assert_eq!(fs::read(&iso.path).unwrap(), b"abc");
        assert_eq!(fs::read_dir(iso.path.parent().unwrap()).unwrap().count(), 1);
    }

    #[test]
    fn short_upload_is_refused_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let groups = groups(dir.path());
        let mut upload = Upload::begin(&groups, "sg0", "a.iso", 4).unwrap();
        upload.write(b"abc").unwrap();

        let err = upload.finish("x").unwrap_err();

        assert!(
            matches!(
                err,
                Error::Size {
                    expected: 4,
                    got: 3,
                    ..
                }
            ),
            "{err}"
        );
        assert!(matches!(
            find(&groups, "sg0", "a.iso"),
            Err(Error::Missing { .. })
        ));
        let isos = dir.path().join("sg0").join(DIR);
        assert_eq!(fs::read_dir(isos).unwrap().count(), 0);
    }

    #[test]
    fn upload_whose_bytes_do_not_hash_to_the_commit_is_not_kept() {
        let dir = tempfile::tempdir().unwrap();
        let groups = groups(dir.path());
        let mut upload = Upload::begin(&groups, "sg0", "a.iso", 3).unwrap();
        upload.write(b"abd").unwrap();

        let err = upload
            .finish("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
            .unwrap_err();

        assert!(matches!(err, Error::Checksum { .. }), "{err}");
        assert!(matches!(
            find(&groups, "sg0", "a.iso"),
            Err(Error::Missing { .. })
        ));
    }

    #[test]
    fn an_iso_named_like_a_temporary_file_survives_the_sweep() {
        let dir = tempfile::tempdir().unwrap();
        let groups = groups(dir.path());
        let mut upload = Upload::begin(&groups, "sg0", "install.uploading", 1).unwrap();
        upload.write(b"x").unwrap();
        upload
            .finish(&format!("{:x}", Sha256::digest(b"x")))
            .unwrap();

        sweep(&groups);

        find(&groups, "sg0", "install.uploading").unwrap();
    }

    #[test]
    fn long_upload_is_refused_at_the_first_extra_byte() {
        let dir = tempfile::tempdir().unwrap();
        let groups = groups(dir.path());
        let mut upload = Upload::begin(&groups, "sg0", "a.iso", 2).unwrap();

        let err = upload.write(b"abc").unwrap_err();

        assert!(
            matches!(
                err,
                Error::Size {
                    expected: 2,
                    got: 3,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn upload_larger_than_free_space_is_refused_before_writing() {
        let dir = tempfile::tempdir().unwrap();
        let groups = groups(dir.path());

        let err = Upload::begin(&groups, "sg0", "big.iso", u64::MAX).unwrap_err();

        assert!(matches!(err, Error::NoSpace { .. }), "{err}");
        assert_eq!(
            fs::read_dir(dir.path().join("sg0").join(DIR))
                .unwrap()
                .count(),
            0
        );
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
        let mut done = Upload::begin(&groups, "sg0", "done.iso", 1).unwrap();
        done.write(b"x").unwrap();
        done.finish(&format!("{:x}", Sha256::digest(b"x"))).unwrap();
        let left = Upload::begin(&groups, "sg0", "left.iso", 1).unwrap();
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
