//! A local file streamed to the pair (an ISO upload, an import): a header message, the
//! file's bytes in chunks, then their SHA-256, read on a blocking thread a few chunks ahead
//! of the network, with a progress line on a terminal (none under cron).

use std::fs::File;
use std::io::{IsTerminal, Read};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;

use crate::progress::Progress;

/// Bytes per message.
const CHUNK: usize = 1 << 20;
/// Chunks read ahead of the network.
const DEPTH: usize = 4;

/// A file opened for streaming, with its size.
#[derive(Debug)]
pub struct Source {
    path: PathBuf,
    file: File,
    /// Its size in bytes.
    pub size_bytes: u64,
}

impl Source {
    /// Opens `path`, refusing an empty file.
    pub fn open(path: &Path) -> anyhow::Result<Source> {
        let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let size_bytes = file
            .metadata()
            .with_context(|| format!("reading the size of {}", path.display()))?
            .len();
        if size_bytes == 0 {
            bail!("{} is empty", path.display());
        }
        Ok(Source {
            path: path.to_path_buf(),
            file,
            size_bytes,
        })
    }

    /// The file's name, without its directory.
    pub fn file_name(&self) -> Option<String> {
        self.path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
    }

    /// Starts reading: the messages to send (`header` first, then `data` of each chunk,
    /// then `sha256` of them all) and the reader, whose end says whether the file was read
    /// whole.
    pub async fn stream<M: Send + 'static>(
        self,
        header: M,
        data: fn(Vec<u8>) -> M,
        sha256: fn(String) -> M,
    ) -> anyhow::Result<(ReceiverStream<M>, Reader)> {
        let (tx, rx) = mpsc::channel(DEPTH);
        if tx.send(header).await.is_err() {
            bail!("queueing the header failed");
        }
        let name = self.file_name().unwrap_or_default();
        let progress = std::io::stderr()
            .is_terminal()
            .then(|| Progress::new(&name, self.size_bytes));
        let Source { path, file, .. } = self;
        let task =
            tokio::task::spawn_blocking(move || read_parts(file, &tx, progress, data, sha256));
        Ok((ReceiverStream::new(rx), Reader { path, task }))
    }
}

/// The thread reading a file into its messages.
#[derive(Debug)]
pub struct Reader {
    path: PathBuf,
    task: JoinHandle<std::io::Result<()>>,
}

impl Reader {
    /// Waits for the reader: a read error means the pair saw a short file and refused it;
    /// this says why.
    pub async fn finish(self) -> anyhow::Result<()> {
        self.task
            .await
            .context("the file reader stopped")?
            .with_context(|| format!("reading {}", self.path.display()))
    }
}

/// Sends the file's bytes, then their SHA-256; stops early if the stream ended.
fn read_parts<M>(
    mut file: File,
    tx: &mpsc::Sender<M>,
    mut progress: Option<Progress>,
    data: fn(Vec<u8>) -> M,
    sha256: fn(String) -> M,
) -> std::io::Result<()> {
    let mut hasher = Sha256::new();
    let mut sent: u64 = 0;
    loop {
        let mut buf = vec![0u8; CHUNK];
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        buf.truncate(n);
        hasher.update(&buf);
        if tx.blocking_send(data(buf)).is_err() {
            return Ok(());
        }
        sent += n as u64;
        if let Some(progress) = &mut progress {
            progress.show(sent);
        }
    }
    let _ = tx.blocking_send(sha256(format!("{:x}", hasher.finalize())));
    if let Some(progress) = &mut progress {
        progress.done();
    }
    Ok(())
}
