//! Snapshot files copied to the peer over the A-Links (replicator service `files`), so a
//! protected VM's snapshots survive the loss of its host without the controllers carrying a
//! byte of guest data.
//!
//! One connection per file: the sender writes a JSON header line (group, path inside the
//! group, size), the bytes, and a trailer line with their SHA-256 (computed as they are sent:
//! the file is read once); the receiver writes `PATH.creating`, checks size and checksum,
//! syncs and renames it into place, and answers one JSON line. Only paths of
//! snapshot generations (`.snapshots/VOLUME/ID.qcow2`) are accepted.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use super::chain::DIR;
use crate::storage::{self, StorageGroups};

/// Bytes per read and write.
const CHUNK: usize = 1 << 20;
/// Longest header line accepted.
const MAX_HEADER: u64 = 4096;

/// Errors of a transfer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The connection or a file failed.
    #[error("{op}")]
    Io {
        /// What was being done.
        op: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The peer refused or failed the file.
    #[error("the peer did not keep {path}: {reason}")]
    Refused {
        /// The file.
        path: String,
        /// The peer's words.
        reason: String,
    },
}

#[derive(Debug, Serialize, Deserialize)]
struct Header {
    group: String,
    path: String,
    size: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct Trailer {
    sha256: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct Answer {
    error: Option<String>,
}

/// Sends `file` (of storage group `group`, at `path` inside it) through `socket` to the
/// peer's receiver; returns once the peer has it synced in place.
pub async fn send(socket: &Path, group: &str, path: &str, file: &Path) -> Result<(), Error> {
    let io = |op: &str| {
        let op = format!("{op} {}", file.display());
        move |source| Error::Io { op, source }
    };
    let mut source = tokio::fs::File::open(file).await.map_err(io("opening"))?;
    let size = source
        .metadata()
        .await
        .map_err(io("reading the size of"))?
        .len();
    let stream = UnixStream::connect(socket)
        .await
        .map_err(io("connecting to the peer for"))?;
    let (read, mut write) = stream.into_split();
    let header = Header {
        group: group.to_string(),
        path: path.to_string(),
        size,
    };
    write
        .write_all(&json_line(&header))
        .await
        .map_err(io("sending the header of"))?;
    let mut hasher = Sha256::new();
    let mut left = size;
    let mut buf = vec![0u8; CHUNK];
    while left > 0 {
        let want = usize::try_from(left).unwrap_or(CHUNK).min(CHUNK);
        let n = source.read(&mut buf[..want]).await.map_err(io("reading"))?;
        if n == 0 {
            return Err(io("reading")(std::io::ErrorKind::UnexpectedEof.into()));
        }
        hasher.update(&buf[..n]);
        write.write_all(&buf[..n]).await.map_err(io("sending"))?;
        left -= n as u64;
    }
    let trailer = Trailer {
        sha256: format!("{:x}", hasher.finalize()),
    };
    write
        .write_all(&json_line(&trailer))
        .await
        .map_err(io("sending the checksum of"))?;
    write.flush().await.map_err(io("sending"))?;
    let mut answer = String::new();
    BufReader::new(read)
        .take(MAX_HEADER)
        .read_line(&mut answer)
        .await
        .map_err(io("reading the peer's answer for"))?;
    match serde_json::from_str::<Answer>(&answer) {
        Ok(Answer { error: None }) => Ok(()),
        Ok(Answer {
            error: Some(reason),
        }) => Err(Error::Refused {
            path: path.to_string(),
            reason,
        }),
        Err(e) => Err(Error::Refused {
            path: path.to_string(),
            reason: format!("unreadable answer {answer:?}: {e}"),
        }),
    }
}

/// Receives files on `listener` into `groups` until the task is dropped.
pub async fn serve(listener: UnixListener, groups: StorageGroups) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let groups = groups.clone();
        tokio::spawn(async move {
            let (read, mut write) = stream.into_split();
            let outcome = receive(BufReader::new(read), &groups).await;
            let answer = Answer {
                error: outcome.as_ref().err().cloned(),
            };
            match &outcome {
                Ok(path) => {
                    tracing::info!(path = %path.display(), "snapshot file received from the peer")
                }
                Err(e) => tracing::warn!(error = %e, "snapshot file from the peer refused"),
            }
            let _ = write.write_all(&json_line(&answer)).await;
        });
    }
}

async fn receive(
    mut read: BufReader<tokio::net::unix::OwnedReadHalf>,
    groups: &StorageGroups,
) -> Result<PathBuf, String> {
    let mut line = String::new();
    (&mut read)
        .take(MAX_HEADER)
        .read_line(&mut line)
        .await
        .map_err(|e| format!("reading the header: {e}"))?;
    let header: Header = serde_json::from_str(&line).map_err(|e| format!("bad header: {e}"))?;
    let path = match target(groups, &header.group, &header.path) {
        Ok(path) => path,
        Err(e) => {
            // Read what was sent, so the sender gets this answer rather than a broken pipe.
            let _ =
                tokio::io::copy(&mut (&mut read).take(header.size), &mut tokio::io::sink()).await;
            let _ = read_trailer(&mut read).await;
            return Err(e);
        }
    };
    let tmp = path.with_extension("qcow2.creating");
    let written = write_file(&mut read, &tmp, header.size).await;
    let announced = match &written {
        Ok(_) => read_trailer(&mut read).await,
        Err(_) => Err(String::new()),
    };
    let checked = written.and_then(|sha256| {
        let announced = announced?;
        if sha256 == announced.sha256 {
            daemon::fsutil::sync_rename(&tmp, &path)
                .map_err(|e| format!("syncing {} into place: {e}", path.display()))
        } else {
            Err(format!(
                "checksum mismatch: received {sha256}, announced {}",
                announced.sha256
            ))
        }
    });
    if checked.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    checked.map(|()| path)
}

/// The file a header names, if it is a snapshot generation of a known group.
fn target(groups: &StorageGroups, group: &str, path: &str) -> Result<PathBuf, String> {
    let parts: Vec<&str> = path.split('/').collect();
    let valid = matches!(parts.as_slice(), [dir, volume, file]
        if *dir == DIR
            && storage::check_name(volume).is_ok()
            && file.strip_suffix(".qcow2").is_some_and(|id| storage::check_name(id).is_ok()));
    if !valid {
        return Err(format!("{path:?} is not a snapshot file"));
    }
    let dir = groups.group_dir(group).map_err(|e| e.to_string())?;
    let target = dir.join(path);
    if let Some(parent) = target.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| format!("creating {}: {e}", parent.display()))?;
    }
    Ok(target)
}

/// Writes `size` bytes from `read` to `path`; returns their SHA-256.
async fn write_file(
    read: &mut BufReader<tokio::net::unix::OwnedReadHalf>,
    path: &Path,
    size: u64,
) -> Result<String, String> {
    let mut file = tokio::fs::File::create(path)
        .await
        .map_err(|e| format!("creating {}: {e}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut left = size;
    let mut buf = vec![0u8; CHUNK];
    while left > 0 {
        let want = usize::try_from(left).unwrap_or(CHUNK).min(CHUNK);
        let n = read
            .read(&mut buf[..want])
            .await
            .map_err(|e| format!("receiving: {e}"))?;
        if n == 0 {
            return Err(format!("the sender stopped {left} bytes short"));
        }
        hasher.update(&buf[..n]);
        file.write_all(&buf[..n])
            .await
            .map_err(|e| format!("writing {}: {e}", path.display()))?;
        left -= n as u64;
    }
    file.flush()
        .await
        .map_err(|e| format!("writing {}: {e}", path.display()))?;
    Ok(format!("{:x}", hasher.finalize()))
}

/// The sender's checksum line after the bytes.
async fn read_trailer(
    read: &mut BufReader<tokio::net::unix::OwnedReadHalf>,
) -> Result<Trailer, String> {
    let mut line = String::new();
    read.take(MAX_HEADER)
        .read_line(&mut line)
        .await
        .map_err(|e| format!("reading the checksum: {e}"))?;
    serde_json::from_str(&line).map_err(|e| format!("bad checksum line {line:?}: {e}"))
}

/// `value` as one JSON line.
fn json_line(value: &impl Serialize) -> Vec<u8> {
    let mut line = serde_json::to_vec(value).unwrap_or_default();
    line.push(b'\n');
    line
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[tokio::test]
    async fn a_snapshot_file_arrives_whole_and_other_paths_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let groups = StorageGroups::open(BTreeMap::from([(
            "sg0".to_string(),
            dir.path().join("peer"),
        )]))
        .unwrap();
        let socket = dir.path().join("files.sock");
        let server = tokio::spawn(serve(UnixListener::bind(&socket).unwrap(), groups));
        let source = dir.path().join("gen.qcow2");
        std::fs::write(&source, vec![7u8; 3 * CHUNK + 5]).unwrap();

        send(&socket, "sg0", ".snapshots/vol.raw/1.qcow2", &source)
            .await
            .unwrap();
        let escape = send(&socket, "sg0", "../../etc/x.qcow2", &source).await;

        let copy = dir.path().join("peer/.snapshots/vol.raw/1.qcow2");
        assert_eq!(
            std::fs::read(copy).unwrap(),
            std::fs::read(&source).unwrap()
        );
        assert!(matches!(escape, Err(Error::Refused { .. })), "{escape:?}");
        server.abort();
    }
}
