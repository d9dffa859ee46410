//! The NBD server: exports files (a VM's replica volumes) over TCP or a Unix socket, one task
//! per connection, requests answered in order. Every write is durable (written, then
//! `fdatasync`) before its reply, whatever the client's FUA flag says: QEMU's write-blocking
//! mirror never forwards the guest's flushes to its target, so a reply is the only promise the
//! guest's acknowledgement rests on (notes/sync-disk-mirror.md).
//!
//! The exception is FT's epoch mode ([`Exports::begin_epochs`], [`super::epoch`]): writes are
//! held in memory, seen by reads, and reach the file only when their epoch commits
//! ([`Exports::commit_epoch`]); a flush then syncs nothing, by design.
//!
//! Removing an export ([`Exports::remove`]) revokes it: its open connections are closed, and
//! once `remove` returns no request of theirs is running or will run.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;

use super::epoch::{EpochApplied, Full, Log, MAX_HELD};
use super::proto::{self, Command, ProtoError, Request};

/// Largest read or write one request may ask for (NBD's customary limit).
pub const MAX_IO: u32 = 32 << 20;
/// Largest option data accepted during the handshake.
const MAX_OPTION: u32 = 4096;
/// Zeroes written per step of a WRITE_ZEROES.
const ZERO_CHUNK: usize = 1 << 20;

/// Errors of the NBD server.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Applying an epoch's held writes to the file, or syncing it, failed; the writes stay
    /// held, so a later commit applies them again.
    #[error("committing the held writes of export {name}")]
    CommitEpoch {
        /// Export name.
        name: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Reading or writing the connection failed.
    #[error("NBD connection with {peer}")]
    Connection {
        /// The client.
        peer: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// An epoch was committed on an export that is not holding writes.
    #[error("export {name} is not in epoch mode (begin_epochs first)")]
    NotInEpochs {
        /// Export name.
        name: String,
    },
    /// An export's file cannot be opened or sized.
    #[error("opening export {name} at {path}")]
    Open {
        /// Export name.
        name: String,
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The client broke the protocol; the connection is closed.
    #[error("NBD client {peer} broke the protocol")]
    Protocol {
        /// The client.
        peer: String,
        /// What it did.
        #[source]
        source: ProtoError,
    },
    /// No export has this name (never added, or removed).
    #[error("no NBD export named {name}")]
    UnknownExport {
        /// Export name.
        name: String,
    },
    /// A write asked for more than [`MAX_IO`] bytes: its payload cannot be skipped safely.
    #[error("NBD client {peer} sent a {length}-byte write (at most {MAX_IO})")]
    WriteTooLong {
        /// The client.
        peer: String,
        /// The length asked for.
        length: u32,
    },
}

/// One exported file.
#[derive(Debug)]
pub struct Export {
    name: String,
    file: Arc<File>,
    size: u64,
    writable: bool,
    /// Requests run under its read lock; revoking, committing and ending epochs take the
    /// write lock, so wait for them (and they wait in turn).
    gate: Arc<tokio::sync::RwLock<()>>,
    /// True once the export is removed: its connections close.
    revoked: watch::Sender<bool>,
    /// In epoch mode, the writes held since the last commit.
    epoch: Mutex<Option<Log>>,
    /// The cap on held bytes ([`MAX_HELD`]; smaller in tests).
    max_held: u64,
}

impl Export {
    /// Opens `path` for export (read-write if `writable`).
    pub fn open(name: &str, path: &Path, writable: bool) -> Result<Export, Error> {
        let failed = |source| Error::Open {
            name: name.to_string(),
            path: path.to_path_buf(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(writable)
            .open(path)
            .map_err(failed)?;
        let size = file.metadata().map_err(failed)?.len();
        Ok(Export {
            name: name.to_string(),
            file: Arc::new(file),
            size,
            writable,
            gate: Arc::new(tokio::sync::RwLock::new(())),
            revoked: watch::Sender::new(false),
            epoch: Mutex::new(None),
            max_held: MAX_HELD,
        })
    }

    /// Lets one request run: a guard to hold while it runs, or `None` once revoked.
    async fn admit(&self) -> Option<tokio::sync::RwLockReadGuard<'_, ()>> {
        let guard = self.gate.read().await;
        (!*self.revoked.borrow()).then_some(guard)
    }

    /// Closes the export's connections, waits for the requests they are running and drops
    /// any held writes.
    async fn revoke(&self) {
        self.revoked.send_replace(true);
        let _gate = self.gate.write().await;
        if let Some(log) = self.held().take() {
            tracing::info!(export = %self.name, dropped = log.len(), "NBD export removed in epoch mode: held writes dropped");
        }
    }

    /// The epoch state: `Some` log in epoch mode.
    fn held(&self) -> MutexGuard<'_, Option<Log>> {
        self.epoch
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Enters epoch mode; a no-op if already in it (the held writes stay).
    fn begin_epochs(&self) {
        self.held().get_or_insert_with(|| Log::new(self.max_held));
    }

    /// The blocking part of a commit, run with the gate held for writing: applies the held
    /// writes, syncs and empties the log.
    fn commit(&self) -> Result<EpochApplied, Error> {
        let mut held = self.held();
        let Some(log) = held.as_mut() else {
            return Err(Error::NotInEpochs {
                name: self.name.clone(),
            });
        };
        let applied = log.apply(&self.file).map_err(|source| Error::CommitEpoch {
            name: self.name.clone(),
            source,
        })?;
        log.clear();
        Ok(applied)
    }

    /// Leaves epoch mode, dropping the held writes; returns how many there were.
    fn end_epochs(&self) -> usize {
        self.held().take().map_or(0, |log| log.len())
    }

    fn flags(&self) -> u16 {
        let base = proto::TX_HAS_FLAGS | proto::TX_SEND_FLUSH | proto::TX_SEND_FUA;
        if self.writable {
            base | proto::TX_SEND_WRITE_ZEROES
        } else {
            base | proto::TX_READ_ONLY
        }
    }
}

/// The exports by name; cheap to clone, changed while the server runs.
#[derive(Clone, Debug, Default)]
pub struct Exports {
    inner: Arc<RwLock<BTreeMap<String, Arc<Export>>>>,
}

impl Exports {
    /// Adds (or replaces) export `name`; new connections see it.
    pub fn insert(&self, name: &str, export: Export) {
        self.write().insert(name.to_string(), Arc::new(export));
    }

    /// Removes export `name` and closes its open connections; once this returns, none of
    /// their requests is running or will run. Removing an unknown name does nothing.
    pub async fn remove(&self, name: &str) {
        let removed = self.write().remove(name);
        if let Some(export) = removed {
            export.revoke().await;
        }
    }

    /// From now on writes to export `name` are held in memory until [`Exports::commit_epoch`]
    /// (FT); a no-op if it is already in epoch mode. Errors if there is no such export.
    pub fn begin_epochs(&self, name: &str) -> Result<(), Error> {
        self.known(name)?.begin_epochs();
        tracing::info!(export = %name, "NBD export enters epoch mode");
        Ok(())
    }

    /// Applies the writes held since the last commit, in arrival order, then `fdatasync`s;
    /// keeps holding later writes. Call it before the checkpoint's ack lets the primary
    /// resume, or the next epoch's first writes are committed too. Returns what was applied.
    pub async fn commit_epoch(&self, name: &str) -> Result<EpochApplied, Error> {
        self.apply_held(name, false).await
    }

    /// Applies the held writes and leaves epoch mode in one step, no request in between: the
    /// writer lives on (it is protected anew), so every write it got acknowledged counts.
    /// Not in epoch mode: nothing to do.
    pub async fn settle_epochs(&self, name: &str) -> Result<EpochApplied, Error> {
        match self.apply_held(name, true).await {
            Err(Error::NotInEpochs { .. }) => Ok(EpochApplied::default()),
            other => other,
        }
    }

    /// Applies the held writes under the export's gate; `leave`: then leaves epoch mode
    /// before any other request runs.
    async fn apply_held(&self, name: &str, leave: bool) -> Result<EpochApplied, Error> {
        let export = self.known(name)?;
        // Owned, so a cancelled commit still keeps requests out until its apply is done.
        let gate = export.gate.clone().write_owned().await;
        if *export.revoked.borrow() {
            return Err(Error::UnknownExport {
                name: name.to_string(),
            });
        }
        match export.held().as_ref().map(Log::len) {
            None => {
                return Err(Error::NotInEpochs {
                    name: name.to_string(),
                });
            }
            Some(0) if !leave => return Ok(EpochApplied::default()),
            Some(_) => {}
        }
        let committing = export.clone();
        let done = tokio::task::spawn_blocking(move || {
            let _gate = gate;
            let applied = committing.commit()?;
            if leave {
                committing.end_epochs();
            }
            Ok(applied)
        })
        .await;
        done.unwrap_or_else(|e| {
            Err(Error::CommitEpoch {
                name: name.to_string(),
                source: std::io::Error::other(e.to_string()),
            })
        })
    }

    /// Drops the held writes (failover: they belong to an epoch that never committed) and
    /// returns to write-through mode. Returns how many writes were dropped (0 if the export
    /// was not in epoch mode).
    pub async fn end_epochs(&self, name: &str) -> Result<usize, Error> {
        let export = self.known(name)?;
        let _gate = export.gate.write().await;
        let dropped = export.end_epochs();
        tracing::info!(export = %name, dropped, "NBD export leaves epoch mode");
        Ok(dropped)
    }

    /// Export `name`, or [`Error::UnknownExport`].
    fn known(&self, name: &str) -> Result<Arc<Export>, Error> {
        self.get(name).ok_or_else(|| Error::UnknownExport {
            name: name.to_string(),
        })
    }

    fn get(&self, name: &str) -> Option<Arc<Export>> {
        self.inner
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(name)
            .cloned()
    }

    fn names(&self) -> Vec<String> {
        self.inner
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .keys()
            .cloned()
            .collect()
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, Arc<Export>>> {
        self.inner
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Accepts connections on `listener` forever, serving `exports`.
pub async fn serve(listener: TcpListener, exports: Exports) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(error = %e, "accepting an NBD connection failed");
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let (read, write) = stream.into_split();
        spawn_connection(read, write, peer.to_string(), exports.clone());
    }
}

/// Accepts connections on the Unix socket `listener` forever, serving `exports`.
pub async fn serve_unix(listener: UnixListener, exports: Exports) {
    let mut accepted = 0u64;
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "accepting an NBD connection failed");
                continue;
            }
        };
        accepted += 1;
        let (read, write) = stream.into_split();
        spawn_connection(read, write, format!("unix#{accepted}"), exports.clone());
    }
}

/// Serves one client in its own task; `peer` names it in logs and errors.
fn spawn_connection<R, W>(read: R, write: W, peer: String, exports: Exports)
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        if let Err(e) = connection(read, write, &peer, &exports).await {
            tracing::warn!(%peer, error = %daemon::error_chain(&e), "NBD connection ended");
        }
    });
}

/// One client: handshake, then requests until it disconnects.
async fn connection<R, W>(read: R, write: W, peer: &str, exports: &Exports) -> Result<(), Error>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let (mut r, mut w) = (BufReader::new(read), BufWriter::new(write));
    let io = |source| Error::Connection {
        peer: peer.to_string(),
        source,
    };
    w.write_all(&proto::handshake()).await.map_err(io)?;
    w.flush().await.map_err(io)?;
    let no_zeroes =
        proto::client_flags(r.read_u32().await.map_err(io)?).map_err(|source| Error::Protocol {
            peer: peer.to_string(),
            source,
        })?;
    let Some((name, export)) = haggle(&mut r, &mut w, peer, exports, no_zeroes).await? else {
        return Ok(());
    };
    tracing::info!(%peer, export = %name, size = export.size, "NBD transmission begins");
    let outcome = transmit(&mut r, &mut w, peer, &export).await;
    tracing::info!(%peer, export = %name, ok = outcome.is_ok(), "NBD transmission ends");
    outcome
}

/// The option phase: returns the export chosen, or `None` if the client aborted.
async fn haggle<R, W>(
    r: &mut BufReader<R>,
    w: &mut BufWriter<W>,
    peer: &str,
    exports: &Exports,
    no_zeroes: bool,
) -> Result<Option<(String, Arc<Export>)>, Error>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let io = |source| Error::Connection {
        peer: peer.to_string(),
        source,
    };
    let protocol = |source| Error::Protocol {
        peer: peer.to_string(),
        source,
    };
    loop {
        let mut header = [0u8; proto::OPTION_LEN];
        r.read_exact(&mut header).await.map_err(io)?;
        let (option, length) = proto::decode_option(&header, MAX_OPTION).map_err(protocol)?;
        let mut data = vec![0u8; usize::try_from(length).unwrap_or(0)];
        r.read_exact(&mut data).await.map_err(io)?;
        match option {
            proto::OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(&data).into_owned();
                // No way to refuse: the protocol says close the connection.
                let Some(export) = exports.get(&name) else {
                    return Ok(None);
                };
                let reply = proto::export_name_reply(export.size, export.flags(), no_zeroes);
                w.write_all(&reply).await.map_err(io)?;
                w.flush().await.map_err(io)?;
                return Ok(Some((name, export)));
            }
            proto::OPT_GO | proto::OPT_INFO => {
                let name = proto::go_export_name(&data).map_err(protocol)?;
                let Some(export) = exports.get(&name) else {
                    reply(w, option, proto::REP_ERR_UNKNOWN, b"no such export", peer).await?;
                    continue;
                };
                let info = proto::info_export(export.size, export.flags());
                reply(w, option, proto::REP_INFO, &info, peer).await?;
                let sizes = proto::info_block_size(1, 4096, MAX_IO);
                reply(w, option, proto::REP_INFO, &sizes, peer).await?;
                reply(w, option, proto::REP_ACK, &[], peer).await?;
                if option == proto::OPT_GO {
                    return Ok(Some((name, export)));
                }
            }
            proto::OPT_LIST => {
                for name in exports.names() {
                    let mut entry = (u32::try_from(name.len()).unwrap_or(0))
                        .to_be_bytes()
                        .to_vec();
                    entry.extend_from_slice(name.as_bytes());
                    reply(w, option, proto::REP_SERVER, &entry, peer).await?;
                }
                reply(w, option, proto::REP_ACK, &[], peer).await?;
            }
            proto::OPT_ABORT => {
                reply(w, option, proto::REP_ACK, &[], peer).await?;
                return Ok(None);
            }
            // Structured replies, metadata contexts, TLS and the rest: not offered.
            _ => reply(w, option, proto::REP_ERR_UNSUP, &[], peer).await?,
        }
    }
}

async fn reply<W: AsyncWrite + Unpin>(
    w: &mut BufWriter<W>,
    option: u32,
    kind: u32,
    data: &[u8],
    peer: &str,
) -> Result<(), Error> {
    let io = |source| Error::Connection {
        peer: peer.to_string(),
        source,
    };
    w.write_all(&proto::option_reply(option, kind, data))
        .await
        .map_err(io)?;
    w.flush().await.map_err(io)
}

/// The transmission phase: one request at a time, answered in order, until the client
/// leaves or the export is revoked (then the connection closes without a reply).
async fn transmit<R, W>(
    r: &mut BufReader<R>,
    w: &mut BufWriter<W>,
    peer: &str,
    export: &Arc<Export>,
) -> Result<(), Error>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let io = |source| Error::Connection {
        peer: peer.to_string(),
        source,
    };
    let mut revoked = export.revoked.subscribe();
    loop {
        let mut header = [0u8; proto::REQUEST_LEN];
        tokio::select! {
            read = r.read_exact(&mut header) => match read {
                Ok(_) => {}
                // A client that closes between requests has simply left.
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) => return Err(io(e)),
            },
            _ = revoked.wait_for(|gone| *gone) => return closed_by_removal(peer),
        }
        let request = proto::decode_request(&header).map_err(|source| Error::Protocol {
            peer: peer.to_string(),
            source,
        })?;
        let payload = match request.command {
            Command::Write if request.length > MAX_IO => {
                return Err(Error::WriteTooLong {
                    peer: peer.to_string(),
                    length: request.length,
                });
            }
            Command::Write => {
                let mut data = vec![0u8; usize::try_from(request.length).unwrap_or(0)];
                r.read_exact(&mut data).await.map_err(io)?;
                data
            }
            Command::Disconnect => return Ok(()),
            _ => Vec::new(),
        };
        let Some(running) = export.admit().await else {
            return closed_by_removal(peer);
        };
        let (error, data) = execute(export, request, payload).await;
        drop(running);
        w.write_all(&proto::simple_reply(error, request.cookie))
            .await
            .map_err(io)?;
        if error == 0 {
            w.write_all(&data).await.map_err(io)?;
        }
        w.flush().await.map_err(io)?;
    }
}

/// The end of a connection whose export was removed.
fn closed_by_removal(peer: &str) -> Result<(), Error> {
    tracing::info!(%peer, "NBD export removed: closing the connection");
    Ok(())
}

/// Carries out one request on the export: the NBD error (0 = done) and the data to send.
async fn execute(export: &Arc<Export>, request: Request, mut payload: Vec<u8>) -> (u32, Vec<u8>) {
    if let Some(error) = refusal(export, request) {
        return (error, Vec::new());
    }
    if let Some(error) = hold(export, request, &mut payload) {
        return (error, Vec::new());
    }
    let export = export.clone();
    let done = tokio::task::spawn_blocking(move || run(&export, request, &payload)).await;
    match done {
        Ok(Ok(data)) => (0, data),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::StorageFull => (proto::ENOSPC, Vec::new()),
        Ok(Err(e)) => {
            tracing::error!(error = %e, offset = request.offset, length = request.length, "NBD export I/O failed");
            (proto::EIO, Vec::new())
        }
        Err(_) => (proto::EIO, Vec::new()),
    }
}

/// Why `request` cannot be carried out on `export`, if it cannot.
fn refusal(export: &Export, request: Request) -> Option<u32> {
    let end = request.offset.checked_add(u64::from(request.length));
    let in_range = end.is_some_and(|end| end <= export.size);
    match request.command {
        Command::Read | Command::Write | Command::WriteZeroes if !in_range => Some(proto::EINVAL),
        Command::Read | Command::Digest if request.length > MAX_IO => Some(proto::EINVAL),
        Command::Digest if !in_range => Some(proto::EINVAL),
        Command::Write | Command::WriteZeroes if !export.writable => Some(proto::EPERM),
        Command::Read
        | Command::Write
        | Command::WriteZeroes
        | Command::Flush
        | Command::Digest => None,
        Command::Trim | Command::Disconnect | Command::Other(_) => Some(proto::ENOTSUP),
    }
}

/// In epoch mode, takes a write or write-zeroes into the held log, or answers a flush, without
/// touching the file: the reply's error, or `None` to run the request on the file.
fn hold(export: &Export, request: Request, payload: &mut Vec<u8>) -> Option<u32> {
    let mut held = export.held();
    let log = held.as_mut()?;
    let outcome = match request.command {
        Command::Write => log.hold_write(request.offset, std::mem::take(payload)),
        Command::WriteZeroes => log.hold_zeroes(request.offset, u64::from(request.length)),
        // Nothing of the epoch is to be durable before its commit.
        Command::Flush => Ok(()),
        _ => return None,
    };
    match outcome {
        Ok(()) => Some(0),
        Err(Full { held, asked }) => {
            tracing::warn!(export = %export.name, held, asked, max = export.max_held, "NBD epoch log full: write refused (ENOSPC)");
            Some(proto::ENOSPC)
        }
    }
}

/// The file's bytes from `offset`, with any held writes laid over them.
fn read(export: &Export, offset: u64, length: u32) -> std::io::Result<Vec<u8>> {
    let mut data = vec![0u8; usize::try_from(length).unwrap_or(0)];
    export.file.read_exact_at(&mut data, offset)?;
    if let Some(log) = export.held().as_ref() {
        log.overlay(offset, &mut data);
    }
    Ok(data)
}

/// Writes `length` zeroes to `file` from `offset`, a chunk at a time.
pub(super) fn write_zeroes(file: &File, offset: u64, length: u64) -> std::io::Result<()> {
    let zeroes = vec![0u8; ZERO_CHUNK];
    let mut done = 0u64;
    while done < length {
        let step = usize::try_from((length - done).min(ZERO_CHUNK as u64)).unwrap_or(0);
        file.write_all_at(&zeroes[..step], offset + done)?;
        done += step as u64;
    }
    Ok(())
}

/// The blocking part: positional I/O, and `fdatasync` after every change.
fn run(export: &Export, request: Request, payload: &[u8]) -> std::io::Result<Vec<u8>> {
    let file = &export.file;
    match request.command {
        Command::Read => read(export, request.offset, request.length),
        Command::Digest => {
            let data = read(export, request.offset, request.length)?;
            Ok(proto::digest(&data).to_be_bytes().to_vec())
        }
        Command::Write => {
            file.write_all_at(payload, request.offset)?;
            file.sync_data()?;
            Ok(Vec::new())
        }
        Command::WriteZeroes => {
            write_zeroes(file, request.offset, u64::from(request.length))?;
            file.sync_data()?;
            Ok(Vec::new())
        }
        Command::Flush => {
            file.sync_data()?;
            Ok(Vec::new())
        }
        Command::Trim | Command::Disconnect | Command::Other(_) => Ok(Vec::new()),
    }
}

#[cfg(test)]
mod tests;
