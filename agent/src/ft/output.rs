//! Output commit for an FT guest's serial console: what the guest writes is held by the agent
//! until the epoch that produced it has committed on the standby, then appended to the serial
//! log that every reader (`pvctl`, the console) follows. Output of an epoch that never commits
//! is never seen: after a failover the standby runs that epoch again and writes it itself.
//!
//! QEMU's serial port is a client of the gate's Unix socket (`<serial type='unix'>`, see
//! [`crate::domain::FtDomain`]). The gate reads it all the time (QEMU's 16550 would stall the
//! guest otherwise). At a checkpoint, with the guest stopped, [`OutputGate::cut`] drains what
//! the socket holds and marks the epoch's end; [`OutputGate::release`] writes up to that mark
//! once the epoch committed. Unprotected (no standby, or after a failed epoch) the gate
//! passes output straight through.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use std::io::Read as _;
use std::os::fd::AsFd as _;

use tokio::io::AsyncWriteExt;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Mutex, mpsc, oneshot};

/// Bytes read from the socket at a time.
const READ_CHUNK: usize = 16 * 1024;

/// Errors of the output gate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The gate's socket could not be bound.
    #[error("binding the serial gate socket {path}")]
    Bind {
        /// The socket.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The serial log could not be written.
    #[error("appending to the serial log {path}")]
    Log {
        /// The log.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The gate's reader task is gone.
    #[error("the serial gate of {path} stopped")]
    Stopped {
        /// The log.
        path: PathBuf,
    },
}

/// A position in the guest's output: bytes produced up to a checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Mark(u64);

#[derive(Debug, Default)]
struct Held {
    /// Output read but not released.
    bytes: Vec<u8>,
    /// Total bytes ever read (the end of `bytes`).
    read: u64,
    /// Each held line end: its position in the output and when the gate read it.
    line_ends: VecDeque<(u64, Instant)>,
    /// Pass output straight through (no standby to agree with).
    through: bool,
}

/// The output gate of one FT domain's serial console.
#[derive(Debug)]
pub struct OutputGate {
    log: PathBuf,
    held: Arc<Mutex<Held>>,
    cuts: mpsc::Sender<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for OutputGate {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl OutputGate {
    /// Listens on `socket` for QEMU's serial port (before the domain starts) and appends
    /// released output to `log`. `through`: start unprotected, releasing as output arrives.
    pub fn listen(socket: &Path, log: &Path, through: bool) -> Result<OutputGate, Error> {
        let _ = std::fs::remove_file(socket);
        let listener = Listener::bind(socket).map_err(|source| Error::Bind {
            path: socket.to_path_buf(),
            source,
        })?;
        let held = Arc::new(Mutex::new(Held {
            through,
            ..Held::default()
        }));
        let (cuts, cut_requests) = mpsc::channel(4);
        let task = tokio::spawn(read_forever(
            listener,
            held.clone(),
            log.to_path_buf(),
            cut_requests,
        ));
        Ok(OutputGate {
            log: log.to_path_buf(),
            held,
            cuts,
            task,
        })
    }

    /// Marks the end of the epoch being checkpointed: call with the guest stopped, so that the
    /// socket holds all it wrote; everything QEMU wrote so far is read before the mark.
    pub async fn cut(&self) -> Result<Mark, Error> {
        let (done, drained) = oneshot::channel();
        self.cuts.send(done).await.map_err(|_| self.stopped())?;
        drained.await.map_err(|_| self.stopped())?;
        Ok(Mark(self.held.lock().await.read))
    }

    /// Releases the output up to `mark`: its epoch committed. Answers how long each line
    /// released was held, from when the gate read its end (the socket hop after the guest
    /// wrote it) to now.
    pub async fn release(&self, mark: Mark) -> Result<Vec<Duration>, Error> {
        let mut held = self.held.lock().await;
        let now = Instant::now();
        let mut delays = Vec::new();
        while let Some(&(end, read_at)) = held.line_ends.front()
            && end < mark.0
        {
            delays.push(now.saturating_duration_since(read_at));
            held.line_ends.pop_front();
        }
        let first = held.read - held.bytes.len() as u64;
        let upto = usize::try_from(mark.0.saturating_sub(first))
            .unwrap_or(usize::MAX)
            .min(held.bytes.len());
        let released: Vec<u8> = held.bytes.drain(..upto).collect();
        drop(held);
        append(&self.log, &released).await?;
        Ok(delays)
    }

    /// Releases everything held and passes later output straight through: the guest runs
    /// unprotected, so no failover can take its output back.
    pub async fn open(&self) -> Result<(), Error> {
        let mut held = self.held.lock().await;
        held.through = true;
        held.line_ends.clear();
        let released = std::mem::take(&mut held.bytes);
        drop(held);
        append(&self.log, &released).await
    }

    /// Drops the held output: the guest died with it, and its standby (which takes over from
    /// the last committed epoch) writes that output again.
    pub async fn discard(&self) -> usize {
        let mut held = self.held.lock().await;
        let dropped = held.bytes.len();
        held.bytes.clear();
        held.line_ends.clear();
        dropped
    }

    /// Holds output again from now on (the guest is protected anew).
    pub async fn close(&self) {
        self.held.lock().await.through = false;
    }

    fn stopped(&self) -> Error {
        Error::Stopped {
            path: self.log.clone(),
        }
    }
}

/// Accepts QEMU's connections one after another (it reconnects after a restart) and reads
/// them, answering cut requests once the socket is drained.
async fn read_forever(
    listener: Listener,
    held: Arc<Mutex<Held>>,
    log: PathBuf,
    mut cuts: mpsc::Receiver<oneshot::Sender<()>>,
) {
    let mut buf = vec![0u8; READ_CHUNK];
    loop {
        let accepted = tokio::select! {
            accepted = listener.tokio.accept() => accepted.and_then(|(stream, _)| Socket::new(stream)),
            Some(done) = cuts.recv() => {
                // A connection QEMU made but not yet accepted may already hold output.
                let Ok(Some(socket)) = listener.accept_now() else {
                    let _ = done.send(());
                    continue;
                };
                let open = drain(&socket, &mut buf, &held, &log).await;
                let _ = done.send(());
                if !open {
                    continue;
                }
                Ok(socket)
            }
        };
        match accepted {
            Ok(socket) => read_connection(&socket, &mut buf, &held, &log, &mut cuts).await,
            Err(e) => {
                tracing::warn!(log = %log.display(), error = %e, "serial gate: accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

/// The gate's listening socket. A cut must see every connection and byte the kernel holds,
/// which tokio's cached readiness may not have noticed yet: cuts use a duplicate of the
/// descriptor with plain (non-blocking) system calls.
#[derive(Debug)]
struct Listener {
    tokio: UnixListener,
    raw: std::os::unix::net::UnixListener,
}

impl Listener {
    fn bind(path: &Path) -> std::io::Result<Listener> {
        let tokio = UnixListener::bind(path)?;
        let raw = std::os::unix::net::UnixListener::from(tokio.as_fd().try_clone_to_owned()?);
        Ok(Listener { tokio, raw })
    }

    /// A connection waiting to be accepted, if there is one.
    fn accept_now(&self) -> std::io::Result<Option<Socket>> {
        match self.raw.accept() {
            Ok((stream, _)) => {
                stream.set_nonblocking(true)?;
                Socket::new(UnixStream::from_std(stream)?).map(Some)
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// QEMU's connection: waited on through tokio, drained with plain reads of a duplicate.
#[derive(Debug)]
struct Socket {
    tokio: UnixStream,
    raw: std::os::unix::net::UnixStream,
}

impl Socket {
    fn new(tokio: UnixStream) -> std::io::Result<Socket> {
        let raw = std::os::unix::net::UnixStream::from(tokio.as_fd().try_clone_to_owned()?);
        Ok(Socket { tokio, raw })
    }
}

async fn read_connection(
    socket: &Socket,
    buf: &mut [u8],
    held: &Mutex<Held>,
    log: &Path,
    cuts: &mut mpsc::Receiver<oneshot::Sender<()>>,
) {
    loop {
        tokio::select! {
            ready = socket.tokio.readable() => {
                if ready.is_err() || !take(socket, buf, held, log).await {
                    return;
                }
            }
            Some(done) = cuts.recv() => {
                let open = drain(socket, buf, held, log).await;
                let _ = done.send(());
                if !open {
                    return;
                }
            }
        }
    }
}

/// Reads through tokio until it would block (which resets tokio's readiness); false once
/// QEMU closed the socket.
async fn take(socket: &Socket, buf: &mut [u8], held: &Mutex<Held>, log: &Path) -> bool {
    loop {
        match socket.tokio.try_read(buf) {
            Ok(0) => return false,
            Ok(n) => keep(held, log, &buf[..n]).await,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return true,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
    }
}

/// Reads everything the kernel holds, with plain reads; false once QEMU closed the socket.
async fn drain(socket: &Socket, buf: &mut [u8], held: &Mutex<Held>, log: &Path) -> bool {
    loop {
        let mut raw = &socket.raw;
        match raw.read(buf) {
            Ok(0) => return false,
            Ok(n) => keep(held, log, &buf[..n]).await,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return true,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
    }
}

async fn keep(held: &Mutex<Held>, log: &Path, bytes: &[u8]) {
    let mut held = held.lock().await;
    let start = held.read;
    held.read += bytes.len() as u64;
    if !held.through {
        let now = Instant::now();
        let ends = bytes
            .iter()
            .zip(start..)
            .filter(|(byte, _)| **byte == b'\n');
        held.line_ends.extend(ends.map(|(_, at)| (at, now)));
    }
    if held.through {
        drop(held);
        if let Err(e) = append(log, bytes).await {
            tracing::warn!(error = %daemon::error_chain(&e), "serial gate: output lost");
        }
    } else {
        held.bytes.extend_from_slice(bytes);
    }
}

async fn append(log: &Path, bytes: &[u8]) -> Result<(), Error> {
    if bytes.is_empty() {
        return Ok(());
    }
    let failed = |source| Error::Log {
        path: log.to_path_buf(),
        source,
    };
    let mut file = tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .await
        .map_err(failed)?;
    file.write_all(bytes).await.map_err(failed)?;
    // tokio's File writes in the background: only a flush says the bytes reached the log.
    file.flush().await.map_err(failed)
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn gate(through: bool) -> (tempfile::TempDir, OutputGate, UnixStream) {
        let dir = tempfile::tempdir().unwrap();
        let gate = OutputGate::listen(
            &dir.path().join("serial.sock"),
            &dir.path().join("serial.log"),
            through,
        )
        .unwrap();
        let qemu = UnixStream::connect(dir.path().join("serial.sock"))
            .await
            .unwrap();
        (dir, gate, qemu)
    }

    fn log(dir: &tempfile::TempDir) -> String {
        std::fs::read_to_string(dir.path().join("serial.log")).unwrap_or_default()
    }

    #[tokio::test]
    async fn output_is_held_until_its_epoch_is_released() {
        let (dir, gate, mut qemu) = gate(false).await;
        qemu.write_all(b"COUNTER 1\n").await.unwrap();
        let first = gate.cut().await.unwrap();
        qemu.write_all(b"COUNTER 2\n").await.unwrap();
        assert_eq!(log(&dir), "");

        assert_eq!(gate.release(first).await.unwrap().len(), 1);
        assert_eq!(log(&dir), "COUNTER 1\n");

        let second = gate.cut().await.unwrap();
        assert_eq!(gate.release(second).await.unwrap().len(), 1);
        assert_eq!(log(&dir), "COUNTER 1\nCOUNTER 2\n");
    }

    #[tokio::test]
    async fn release_answers_how_long_each_released_line_was_held() {
        let (_dir, gate, mut qemu) = gate(false).await;
        qemu.write_all(b"a\nb\npartial").await.unwrap();
        // The cut has read both line ends: they are held at least as long as this sleep.
        let mark = gate.cut().await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;

        let delays = gate.release(mark).await.unwrap();

        assert_eq!(delays.len(), 2);
        assert!(delays.iter().all(|d| *d >= Duration::from_millis(20)));
        qemu.write_all(b" line\n").await.unwrap();
        let mark = gate.cut().await.unwrap();
        assert_eq!(gate.release(mark).await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn a_cut_reads_everything_written_before_it() {
        let (dir, gate, mut qemu) = gate(false).await;
        let big = vec![b'x'; 3 * READ_CHUNK + 7];
        qemu.write_all(&big).await.unwrap();

        let mark = gate.cut().await.unwrap();
        gate.release(mark).await.unwrap();

        assert_eq!(log(&dir).len(), big.len());
    }

    #[tokio::test]
    async fn opening_releases_what_is_held_and_passes_output_through() {
        let (dir, gate, mut qemu) = gate(false).await;
        qemu.write_all(b"held\n").await.unwrap();
        gate.cut().await.unwrap();

        gate.open().await.unwrap();
        assert_eq!(log(&dir), "held\n");
        qemu.write_all(b"through\n").await.unwrap();
        gate.cut().await.unwrap();

        assert_eq!(log(&dir), "held\nthrough\n");
    }

    #[tokio::test]
    async fn discarded_output_is_never_seen() {
        let (dir, gate, mut qemu) = gate(false).await;
        qemu.write_all(b"COUNTER 1\n").await.unwrap();
        gate.cut().await.unwrap();

        assert_eq!(gate.discard().await, 10);
        gate.open().await.unwrap();

        assert_eq!(log(&dir), "");
    }

    #[tokio::test]
    async fn output_never_released_is_never_seen() {
        let (dir, gate, mut qemu) = gate(false).await;
        qemu.write_all(b"COUNTER 1\n").await.unwrap();
        let first = gate.cut().await.unwrap();
        gate.release(first).await.unwrap();
        qemu.write_all(b"COUNTER 2\n").await.unwrap();
        gate.cut().await.unwrap();

        drop(gate);

        assert_eq!(log(&dir), "COUNTER 1\n");
    }
}
