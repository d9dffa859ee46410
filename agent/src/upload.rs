//! A file received over the network: written under a temporary name beside its final one,
//! checked against the size announced up front and the SHA-256 committed at the end, then
//! synced and renamed into place. A crash or a broken stream never leaves a partial file
//! under the final name; dropped unfinished, an upload removes its temporary file. ISO
//! uploads and imported disk images both arrive this way.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::storage::fs_space;

/// Suffix of an upload's temporary file (its name also starts with '.').
pub const UPLOADING: &str = ".uploading";

/// Errors receiving a file.
#[derive(Debug, thiserror::Error)]
pub enum Error {
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
    /// The storage group lacks room for the announced size.
    #[error(
        "storage group {group} has {free_bytes} bytes free, too few for the {size_bytes} bytes announced; free space there or choose another group"
    )]
    NoSpace {
        /// The storage group.
        group: String,
        /// Space available.
        free_bytes: u64,
        /// The size announced.
        size_bytes: u64,
    },
    /// The bytes written do not hash to the checksum committed.
    #[error("{name} as written here hashes to {ours}, not to the committed {theirs}")]
    Checksum {
        /// File name.
        name: String,
        /// This host's checksum.
        ours: String,
        /// The one committed.
        theirs: String,
    },
    /// The blocking worker writing the file panicked or was cancelled.
    #[error("the worker writing the file failed: {reason}")]
    Worker {
        /// The join error.
        reason: String,
    },
    /// More or fewer bytes arrived than announced.
    #[error("{name} was announced as {expected} bytes but {got} arrived")]
    Size {
        /// File name.
        name: String,
        /// Bytes announced.
        expected: u64,
        /// Bytes received (so far, when too many).
        got: u64,
    },
}

/// A file received and verified.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Received {
    /// Its path.
    pub path: PathBuf,
    /// Its size.
    pub size_bytes: u64,
    /// Lowercase hex SHA-256 of its bytes.
    pub sha256: String,
}

/// An upload in progress.
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
    durable: bool,
}

impl Upload {
    /// Starts receiving `size_bytes` bytes for `path` in storage group `group`, refusing them
    /// up front if its file system lacks the room.
    pub fn begin(group: &str, path: PathBuf, size_bytes: u64) -> Result<Upload, Error> {
        let dir = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        fs::create_dir_all(&dir).map_err(io_err("creating", &dir))?;
        let (_, free_bytes) = fs_space(&dir).map_err(io_err("reading free space of", &dir))?;
        if free_bytes < size_bytes {
            return Err(Error::NoSpace {
                group: group.to_string(),
                free_bytes,
                size_bytes,
            });
        }
        let name = path
            .file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
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
            name,
            file,
            finished: false,
            tmp,
            path,
            expected: size_bytes,
            written: 0,
            hasher: Sha256::new(),
            durable: true,
        })
    }

    /// Marks the file as scratch: renamed into place unsynced. For a file read once soon
    /// after and removed (an imported image, converted into its volume, which is synced):
    /// syncing it too would write every byte to disk twice.
    #[must_use]
    pub fn scratch(mut self) -> Upload {
        self.durable = false;
        self
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

    /// Checks the size and that the bytes hash to `sha256` (the checksum the sender and the
    /// controller verified), then syncs the file (unless scratch) and renames it into place.
    pub fn finish(mut self, sha256: &str) -> Result<Received, Error> {
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
        if self.durable {
            daemon::fsutil::sync_rename(&self.tmp, &self.path)
                .map_err(io_err("syncing into place", &self.path))?;
        } else {
            fs::rename(&self.tmp, &self.path).map_err(io_err("renaming into place", &self.path))?;
        }
        self.finished = true;
        Ok(Received {
            path: self.path.clone(),
            size_bytes: self.written,
            sha256: ours,
        })
    }

    /// [`Upload::write`] on a blocking thread (file writes block); the upload comes back.
    pub async fn append(mut self, data: Vec<u8>) -> Result<Upload, Error> {
        blocking(move || self.write(&data).map(|()| self)).await
    }

    /// [`Upload::finish`] on a blocking thread, handing the file to `keep` there: a caller
    /// that goes away meanwhile drops what `keep` made (a guard that removes the file, say).
    pub async fn commit<T: Send + 'static>(
        self,
        sha256: String,
        keep: impl FnOnce(Received) -> T + Send + 'static,
    ) -> Result<T, Error> {
        blocking(move || self.finish(&sha256).map(keep)).await
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
        // A finished upload's temporary file is the file itself, renamed.
        if !self.finished {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, Error> + Send + 'static,
) -> Result<T, Error> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| Error::Worker {
            reason: e.to_string(),
        })?
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.to_path_buf();
    move |source| Error::Io { op, path, source }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SHA-256("abc") from FIPS 180-2's examples.
    const ABC: &str = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";

    fn entries(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn finished_upload_is_in_place_with_its_sha256() {
        let dir = tempfile::tempdir().unwrap();
        let mut upload = Upload::begin("sg0", dir.path().join("abc"), 3).unwrap();
        upload.write(b"ab").unwrap();
        upload.write(b"c").unwrap();

        let received = upload.finish(ABC).unwrap();

        assert_eq!(received.path, dir.path().join("abc"));
        assert_eq!(received.sha256, ABC);
        assert_eq!(fs::read(&received.path).unwrap(), b"abc");
        assert_eq!(entries(dir.path()), ["abc"]);
    }

    #[test]
    fn short_upload_is_refused_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut upload = Upload::begin("sg0", dir.path().join("a"), 4).unwrap();
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
        assert!(entries(dir.path()).is_empty());
    }

    #[test]
    fn upload_whose_bytes_do_not_hash_to_the_commit_is_not_kept() {
        let dir = tempfile::tempdir().unwrap();
        let mut upload = Upload::begin("sg0", dir.path().join("a"), 3).unwrap();
        upload.write(b"abd").unwrap();

        let err = upload.finish(ABC).unwrap_err();

        assert!(matches!(err, Error::Checksum { .. }), "{err}");
        assert!(entries(dir.path()).is_empty());
    }

    #[test]
    fn long_upload_is_refused_at_the_first_extra_byte() {
        let dir = tempfile::tempdir().unwrap();
        let mut upload = Upload::begin("sg0", dir.path().join("a"), 2).unwrap();

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

        let err = Upload::begin("sg0", dir.path().join("big"), u64::MAX).unwrap_err();

        assert!(matches!(err, Error::NoSpace { .. }), "{err}");
        assert!(entries(dir.path()).is_empty());
    }
}
