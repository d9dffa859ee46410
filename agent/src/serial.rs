//! Guest serial consoles: QEMU appends each guest's first serial port to a log file the agent
//! owns (kept across restarts of the guest and of the agent); readers get its tail and can follow.

use std::io::SeekFrom;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::fs::File;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::sync::mpsc;

/// How often a following reader looks for new output.
const FOLLOW_POLL: Duration = Duration::from_millis(200);
/// Largest chunk sent at once.
const CHUNK: usize = 64 * 1024;

/// A piece of console output at its offset in the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chunk {
    /// Offset of `data` in the log.
    pub offset: u64,
    /// The bytes.
    pub data: Vec<u8>,
}

/// Path of the serial log of the domain `uuid` under `dir`.
pub fn log_path(dir: &Path, uuid: &str) -> PathBuf {
    dir.join(format!("{uuid}.log"))
}

/// Sends the last `tail_bytes` of the log at `path`, then, if `follow`, new output until the
/// receiver goes away. A missing log is empty; a log that shrank is read again from its start.
pub async fn stream(
    path: PathBuf,
    tail_bytes: u64,
    follow: bool,
    out: mpsc::Sender<std::io::Result<Chunk>>,
) {
    if let Err(e) = pump(&path, tail_bytes, follow, &out).await {
        let _ = out.send(Err(e)).await;
    }
}

async fn pump(
    path: &Path,
    tail_bytes: u64,
    follow: bool,
    out: &mpsc::Sender<std::io::Result<Chunk>>,
) -> std::io::Result<()> {
    let mut offset = match tokio::fs::metadata(path).await {
        Ok(meta) => meta.len().saturating_sub(tail_bytes),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(e) => return Err(e),
    };
    let mut buf = vec![0u8; CHUNK];
    loop {
        let read = read_at(path, &mut offset, &mut buf).await?;
        if read > 0 {
            let chunk = Chunk {
                offset: offset - read as u64,
                data: buf[..read].to_vec(),
            };
            if out.send(Ok(chunk)).await.is_err() {
                return Ok(());
            }
            continue;
        }
        if !follow {
            return Ok(());
        }
        tokio::select! {
            () = tokio::time::sleep(FOLLOW_POLL) => {}
            () = out.closed() => return Ok(()),
        }
    }
}

/// Reads what follows `offset` (resetting it when the log shrank) and advances it.
async fn read_at(path: &Path, offset: &mut u64, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut file = match File::open(path).await {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    if file.metadata().await?.len() < *offset {
        *offset = 0;
    }
    file.seek(SeekFrom::Start(*offset)).await?;
    let read = file.read(buf).await?;
    *offset += read as u64;
    Ok(read)
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn collect(path: PathBuf, tail: u64) -> Vec<Chunk> {
        let (tx, mut rx) = mpsc::channel(8);
        stream(path, tail, false, tx).await;
        let mut chunks = Vec::new();
        while let Some(chunk) = rx.recv().await {
            chunks.push(chunk.unwrap());
        }
        chunks
    }

    #[tokio::test]
    async fn stream_tail_sends_last_bytes_with_offset() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.log");
        std::fs::write(&path, "COUNTER 1\nCOUNTER 2\n").unwrap();

        let chunks = collect(path, 10).await;

        assert_eq!(
            chunks,
            vec![Chunk {
                offset: 10,
                data: b"COUNTER 2\n".to_vec()
            }]
        );
    }

    #[tokio::test]
    async fn stream_missing_log_sends_nothing() {
        let dir = tempfile::tempdir().unwrap();

        let chunks = collect(dir.path().join("none.log"), 100).await;

        assert_eq!(chunks, Vec::new());
    }

    #[tokio::test]
    async fn stream_follow_delivers_appended_output() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.log");
        std::fs::write(&path, "a\n").unwrap();
        let (tx, mut rx) = mpsc::channel(8);
        let task = tokio::spawn(stream(path.clone(), 100, true, tx));
        let first = rx.recv().await.unwrap().unwrap();

        let mut log = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        std::io::Write::write_all(&mut log, b"b\n").unwrap();
        let chunk = rx.recv().await.unwrap().unwrap();

        assert_eq!(first.data, b"a\n");
        assert_eq!(chunk.data, b"b\n");
        drop(rx);
        task.await.unwrap();
    }
}
