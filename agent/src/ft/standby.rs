//! The standby side of FT: receives a primary's epochs and applies each one only when it
//! commits, so that the standby QEMU's RAM file, its disk and the kept device state always
//! describe one instant of the primary (the last committed checkpoint). Activation loads that
//! device state into the standby QEMU waiting in `-incoming defer` and resumes it: the guest
//! goes on from the checkpoint with the same boot.
//!
//! Pages of an epoch are held in memory until its `Commit`; before the first commit the
//! standby is not usable anyway, so the initial full copy is written to the RAM file at once.
//! Disk writes reach the same host's NBD server, which holds them per epoch from the first
//! commit on ([`Exports::begin_epochs`]) and applies them at each commit.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::net::{UnixListener, UnixStream};

use super::dirty::{PAGE, is_hole, is_zero};
use super::qmp::{self, Qmp};
use super::wire::{self, Message};
use crate::nbd::Exports;

/// Longest the standby QEMU may take to load a device state (~0.4 MB; milliseconds idle).
const LOAD_TIMEOUT: Duration = Duration::from_secs(30);

/// Errors of the standby.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The standby QEMU's RAM file could not be opened.
    #[error("opening the standby RAM file {path}")]
    OpenRam {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// No standby of that VM is set up here.
    #[error("no FT standby of VM {vm} on this host")]
    Unknown {
        /// The VM.
        vm: String,
    },
    /// The standby never received a committed epoch: there is nothing to resume from.
    #[error("the FT standby of VM {vm} has no committed checkpoint to resume from")]
    NothingCommitted {
        /// The VM.
        vm: String,
    },
    /// An epoch failed to apply earlier: RAM, disk and device state may disagree.
    #[error("the FT standby of VM {vm} is unusable: {reason}")]
    Broken {
        /// The VM.
        vm: String,
        /// What went wrong.
        reason: String,
    },
    /// Writing the device state file for QEMU failed.
    #[error("writing the device state {path}")]
    WriteState {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// QEMU refused or failed a step of the activation.
    #[error("activating the standby QEMU of VM {vm}")]
    Qmp {
        /// The VM.
        vm: String,
        /// The cause.
        #[source]
        source: qmp::Error,
    },
    /// QEMU did not finish loading the device state in time.
    #[error("the standby QEMU of VM {vm} is still {status} after {LOAD_TIMEOUT:?}")]
    LoadTimeout {
        /// The VM.
        vm: String,
        /// Its run state.
        status: String,
    },
}

/// What an activation did and how long each step took.
#[derive(Clone, Copy, Debug)]
pub struct Activated {
    /// The epoch the guest resumed from.
    pub epoch: u64,
    /// Disk writes of the uncommitted epoch that were dropped.
    pub dropped_writes: usize,
    /// Writing the device state file.
    pub write_state: Duration,
    /// `migrate-incoming` until QEMU left `inmigrate`.
    pub load: Duration,
    /// `cont`.
    pub resume: Duration,
}

/// One VM's standby.
#[derive(Debug)]
struct Standby {
    ram: Arc<File>,
    ram_bytes: u64,
    /// The NBD exports of the VM's disks on this host.
    exports: Vec<String>,
    qmp_socket: PathBuf,
    /// Last committed epoch (0: none).
    committed: u64,
    device_state: Vec<u8>,
    /// Pages received for the epoch under way.
    held_pages: Vec<u64>,
    held_data: Vec<u8>,
    broken: Option<String>,
}

/// The standbys of this host, by VM UUID; cheap to clone.
#[derive(Clone, Debug)]
pub struct Standbys {
    node: String,
    exports: Exports,
    inner: Arc<Mutex<BTreeMap<String, Arc<tokio::sync::Mutex<Standby>>>>>,
}

impl Standbys {
    /// The standbys of host `node`, whose disks are served by `exports`.
    pub fn new(node: &str, exports: Exports) -> Standbys {
        Standbys {
            node: node.to_string(),
            exports,
            inner: Arc::default(),
        }
    }

    /// Registers the standby of `vm`: its QEMU waits in `-incoming defer` with RAM file
    /// `ram_path` and QMP socket `qmp_socket`; its disks are exported as `exports`.
    pub fn add(
        &self,
        vm: &str,
        ram_path: &Path,
        qmp_socket: &Path,
        exports: Vec<String>,
    ) -> Result<(), Error> {
        let open_failed = |source| Error::OpenRam {
            path: ram_path.to_path_buf(),
            source,
        };
        let ram = OpenOptions::new()
            .read(true)
            .write(true)
            .open(ram_path)
            .map_err(open_failed)?;
        let ram_bytes = ram.metadata().map_err(open_failed)?.len();
        let standby = Standby {
            ram: Arc::new(ram),
            ram_bytes,
            exports,
            qmp_socket: qmp_socket.to_path_buf(),
            committed: 0,
            device_state: Vec::new(),
            held_pages: Vec::new(),
            held_data: Vec::new(),
            broken: None,
        };
        tracing::info!(vm, node = %self.node, ram = %ram_path.display(), ram_bytes, "FT standby registered");
        self.map()
            .insert(vm.to_string(), Arc::new(tokio::sync::Mutex::new(standby)));
        Ok(())
    }

    /// Whether a standby of `vm` is registered here (from its preparation until it is
    /// removed or activated).
    pub fn holds(&self, vm: &str) -> bool {
        self.map().contains_key(vm)
    }

    /// Forgets the standby of `vm` (its QEMU is gone, replaced or became the primary). A
    /// primary still feeding it gets a Nack at its next commit, so that it stops releasing
    /// output on the strength of a standby that no longer exists.
    pub async fn remove(&self, vm: &str) {
        let removed = self.map().remove(vm);
        if let Some(standby) = removed {
            let mut standby = standby.lock().await;
            standby.broken = Some("the standby was removed".into());
        }
    }

    /// The last epoch `vm`'s standby committed (0: none), or `None` when it has no standby.
    pub async fn committed(&self, vm: &str) -> Option<u64> {
        let standby = self.get(vm).ok()?;
        let standby = standby.lock().await;
        Some(standby.committed)
    }

    /// Accepts primaries' FT streams on `listener` forever.
    pub async fn serve(self, listener: UnixListener) {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    let standbys = self.clone();
                    tokio::spawn(async move { standbys.serve_stream(stream).await });
                }
                Err(e) => {
                    tracing::warn!(node = %self.node, error = %e, "accepting an FT stream failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    /// Serves one primary's stream until it ends or breaks.
    async fn serve_stream(&self, mut stream: UnixStream) {
        let vm = match wire::read(&mut stream).await {
            Ok(Message::Hello { vm }) => vm,
            Ok(other) => {
                tracing::warn!(node = %self.node, message = ?kind(&other), "FT stream did not begin with Hello: closed");
                return;
            }
            Err(e) => {
                tracing::warn!(node = %self.node, error = %daemon::error_chain(&e), "FT stream broke before Hello");
                return;
            }
        };
        let Ok(standby) = self.get(&vm) else {
            tracing::warn!(vm, node = %self.node, "FT stream for a VM without a standby here: closed");
            return;
        };
        tracing::info!(vm, node = %self.node, "FT stream from the primary begins");
        let outcome = self.feed(&vm, &standby, &mut stream).await;
        match outcome {
            Ok(()) => {
                tracing::info!(vm, node = %self.node, "FT stream ends: the primary closed it")
            }
            Err(e) => {
                tracing::warn!(vm, node = %self.node, error = %daemon::error_chain(&e), "FT stream ends: broken");
            }
        }
        // Pages of an epoch that never committed must not reach a later one.
        let mut standby = standby.lock().await;
        standby.held_pages.clear();
        standby.held_data.clear();
    }

    async fn feed(
        &self,
        vm: &str,
        standby: &tokio::sync::Mutex<Standby>,
        stream: &mut UnixStream,
    ) -> Result<(), wire::Error> {
        let welcome = {
            let mut standby = standby.lock().await;
            standby.held_pages.clear();
            standby.held_data.clear();
            Message::Welcome {
                ram_bytes: standby.ram_bytes,
                committed: standby.committed,
            }
        };
        wire::write(stream, &welcome).await?;
        loop {
            let message = match wire::read(stream).await {
                Ok(message) => message,
                Err(wire::Error::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    return Ok(());
                }
                Err(e) => return Err(e),
            };
            match message {
                Message::Pages { pages, data } => {
                    let mut standby = standby.lock().await;
                    hold_pages(&mut standby, pages, data).await;
                }
                Message::Commit {
                    epoch,
                    device_state,
                } => {
                    let mut standby = standby.lock().await;
                    let reply = self.commit(vm, &mut standby, epoch, Ok(device_state)).await;
                    drop(standby);
                    wire::write(stream, &reply).await?;
                }
                Message::CommitDelta { epoch, delta } => {
                    let mut standby = standby.lock().await;
                    let device_state = delta
                        .apply(standby.committed, &standby.device_state)
                        .map_err(|e| format!("rebuilding the device state: {e}"));
                    let reply = self.commit(vm, &mut standby, epoch, device_state).await;
                    drop(standby);
                    wire::write(stream, &reply).await?;
                }
                other => {
                    return Err(wire::Error::Malformed(format!(
                        "unexpected {} from the primary",
                        kind(&other)
                    )));
                }
            }
        }
    }

    /// Applies epoch `epoch`: the disks' held writes, held pages into the RAM file, the
    /// device state kept (`Err`: it could not be rebuilt from a delta). Any failure leaves
    /// the standby broken (its parts may disagree).
    async fn commit(
        &self,
        vm: &str,
        standby: &mut Standby,
        epoch: u64,
        device_state: Result<Vec<u8>, String>,
    ) -> Message {
        if let Some(reason) = &standby.broken {
            return Message::Nack {
                epoch,
                reason: reason.clone(),
            };
        }
        let applied = match device_state {
            Ok(state) => self.apply(standby, epoch, state).await,
            Err(reason) => Err(reason),
        };
        match applied {
            Ok(()) => Message::Ack { epoch },
            Err(reason) => {
                tracing::error!(vm, node = %self.node, epoch, reason, "FT epoch failed to apply: the standby is unusable");
                standby.broken = Some(reason.clone());
                Message::Nack { epoch, reason }
            }
        }
    }

    async fn apply(
        &self,
        standby: &mut Standby,
        epoch: u64,
        device_state: Vec<u8>,
    ) -> Result<(), String> {
        if epoch <= standby.committed {
            return Err(format!(
                "epoch {epoch} arrived after epoch {} committed",
                standby.committed
            ));
        }
        // The disk first, while the primary is surely stopped: every write it holds belongs to
        // this epoch. Were the RAM written first and slowly, a primary giving up on the ack
        // would resume, and its next writes would be committed with this epoch.
        for name in &standby.exports {
            if standby.committed == 0 {
                // The first checkpoint: the disk was written through until now and equals the
                // primary's as of the checkpoint; from here on writes wait for their epoch.
                self.exports
                    .begin_epochs(name)
                    .map_err(|e| format!("holding the writes of disk {name}: {e}"))?;
            } else {
                self.exports
                    .commit_epoch(name)
                    .await
                    .map_err(|e| format!("committing the writes of disk {name}: {e}"))?;
            }
        }
        let pages = std::mem::take(&mut standby.held_pages);
        let data = std::mem::take(&mut standby.held_data);
        write_pages(standby.ram.clone(), standby.ram_bytes, pages, data).await?;
        standby.device_state = device_state;
        standby.committed = epoch;
        Ok(())
    }

    /// Resumes `vm`'s standby from its last committed epoch: drops the disks' uncommitted
    /// writes, loads the device state into the waiting QEMU and continues it. The old primary
    /// must be fenced first: nothing of it may reach this host's disks any more.
    pub async fn activate(&self, vm: &str, state_dir: &Path) -> Result<Activated, Error> {
        let standby = self.get(vm)?;
        let mut standby = standby.lock().await;
        if let Some(reason) = &standby.broken {
            return Err(Error::Broken {
                vm: vm.to_string(),
                reason: reason.clone(),
            });
        }
        if standby.committed == 0 {
            return Err(Error::NothingCommitted { vm: vm.to_string() });
        }
        let mut dropped_writes = 0;
        for name in &standby.exports {
            // An export that never held writes has none to drop.
            dropped_writes += self.exports.end_epochs(name).await.unwrap_or(0);
        }
        let started = Instant::now();
        let path = state_dir.join(format!("{vm}.ft-state"));
        daemon::fsutil::write_atomic(&path, &standby.device_state).map_err(|source| {
            Error::WriteState {
                path: path.clone(),
                source,
            }
        })?;
        let write_state = started.elapsed();
        let qmp_failed = |source| Error::Qmp {
            vm: vm.to_string(),
            source,
        };
        let mut qmp = Qmp::connect(&standby.qmp_socket)
            .await
            .map_err(qmp_failed)?;
        let loading = Instant::now();
        let uri = format!("file:{}", path.display());
        qmp.execute("migrate-incoming", json!({ "uri": uri }))
            .await
            .map_err(qmp_failed)?;
        wait_loaded(vm, &mut qmp).await?;
        let load = loading.elapsed();
        let resuming = Instant::now();
        qmp.execute("cont", serde_json::Value::Null)
            .await
            .map_err(qmp_failed)?;
        // The guest runs here now: no primary may feed this standby again.
        standby.broken = Some("the standby was activated".into());
        Ok(Activated {
            epoch: standby.committed,
            dropped_writes,
            write_state,
            load,
            resume: resuming.elapsed(),
        })
    }

    fn get(&self, vm: &str) -> Result<Arc<tokio::sync::Mutex<Standby>>, Error> {
        self.map()
            .get(vm)
            .cloned()
            .ok_or_else(|| Error::Unknown { vm: vm.to_string() })
    }

    fn map(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Arc<tokio::sync::Mutex<Standby>>>> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Holds an epoch's pages; before the first commit they go straight into the RAM file.
async fn hold_pages(standby: &mut Standby, pages: Vec<u64>, data: Vec<u8>) {
    if standby.committed > 0 {
        standby.held_pages.extend_from_slice(&pages);
        standby.held_data.extend_from_slice(&data);
        return;
    }
    if let Err(reason) = write_pages(standby.ram.clone(), standby.ram_bytes, pages, data).await {
        standby.broken = Some(reason);
    }
}

/// Writes pages into the RAM file, off the async runtime.
async fn write_pages(
    ram: Arc<File>,
    ram_bytes: u64,
    pages: Vec<u64>,
    data: Vec<u8>,
) -> Result<(), String> {
    let written = tokio::task::spawn_blocking(move || {
        for (index, page) in pages.iter().enumerate() {
            if (page + 1) * PAGE as u64 > ram_bytes {
                return Err(format!(
                    "page {page} lies beyond the {ram_bytes}-byte RAM file: the primary's RAM size differs"
                ));
            }
            let bytes = &data[index * PAGE..(index + 1) * PAGE];
            let offset = page * PAGE as u64;
            // Zeros over a hole change nothing and would only allocate it: the copy stays as
            // sparse as the primary's, and so does the RAM that a failover makes primary.
            if is_zero(bytes) && is_hole(&ram, offset).unwrap_or(false) {
                continue;
            }
            ram.write_all_at(bytes, offset)
                .map_err(|e| format!("writing page {page} of the RAM file: {e}"))?;
        }
        Ok(())
    })
    .await;
    written.unwrap_or_else(|e| Err(format!("the RAM writer failed: {e}")))
}

/// Waits until QEMU has loaded the incoming device state (it leaves `inmigrate`).
async fn wait_loaded(vm: &str, qmp: &mut Qmp) -> Result<(), Error> {
    let deadline = Instant::now() + LOAD_TIMEOUT;
    loop {
        let status = qmp.status().await.map_err(|source| Error::Qmp {
            vm: vm.to_string(),
            source,
        })?;
        if status != "inmigrate" {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(Error::LoadTimeout {
                vm: vm.to_string(),
                status,
            });
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

fn kind(message: &Message) -> &'static str {
    match message {
        Message::Hello { .. } => "Hello",
        Message::Welcome { .. } => "Welcome",
        Message::Pages { .. } => "Pages",
        Message::Commit { .. } => "Commit",
        Message::CommitDelta { .. } => "CommitDelta",
        Message::Ack { .. } => "Ack",
        Message::Nack { .. } => "Nack",
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use super::*;
    use crate::ft::state_delta::Delta;

    const PAGE_BYTES: u64 = PAGE as u64;

    async fn send(stream: &mut UnixStream, message: Message) -> Message {
        wire::write(stream, &message).await.expect("send");
        wire::read(stream).await.expect("answer")
    }

    #[tokio::test]
    async fn commits_rebuild_deltas_against_the_last_acknowledged_state() {
        let ram = tempfile::NamedTempFile::new_in("/dev/shm").expect("RAM file in /dev/shm");
        ram.as_file().set_len(4 * PAGE_BYTES).expect("size");
        let standbys = Standbys::new("n1", Exports::default());
        standbys
            .add("vm", ram.path(), Path::new("/nonexistent/qmp"), Vec::new())
            .expect("standby");
        let (mut primary, theirs) = UnixStream::pair().expect("socket pair");
        let serving = {
            let standbys = standbys.clone();
            tokio::spawn(async move { standbys.serve_stream(theirs).await })
        };
        wire::write(&mut primary, &Message::Hello { vm: "vm".into() })
            .await
            .expect("hello");
        assert!(matches!(
            wire::read(&mut primary).await.expect("welcome"),
            Message::Welcome { committed: 0, .. }
        ));
        let first: Vec<u8> = (0..1000u32).map(|i| (i % 251) as u8).collect();
        let mut second = first.clone();
        second[70] ^= 0x55;

        let full = Message::Commit {
            epoch: 1,
            device_state: first.clone(),
        };
        assert_eq!(send(&mut primary, full).await, Message::Ack { epoch: 1 });
        let delta = Delta::between(1, &first, &second).expect("a small change");
        assert_eq!(delta.carried(), 64);
        let answer = send(&mut primary, Message::CommitDelta { epoch: 2, delta }).await;
        assert_eq!(answer, Message::Ack { epoch: 2 });
        {
            let standby = standbys.get("vm").expect("registered");
            let standby = standby.lock().await;
            assert_eq!(standby.device_state, second);
            assert_eq!(standby.committed, 2);
        }
        // A delta against epoch 1 when epoch 2 is held: refused, and the standby unusable.
        let stale = Delta::between(1, &first, &second).expect("a small change");
        let answer = send(
            &mut primary,
            Message::CommitDelta {
                epoch: 3,
                delta: stale,
            },
        )
        .await;
        assert!(
            matches!(&answer, Message::Nack { epoch: 3, reason } if reason.contains("epoch 1")),
            "{answer:?}"
        );
        drop(primary);
        serving.await.expect("stream served");
        let standby = standbys.get("vm").expect("registered");
        assert!(standby.lock().await.broken.is_some());
    }

    #[tokio::test]
    async fn zero_pages_leave_holes_alone_but_overwrite_data() {
        let file = tempfile::NamedTempFile::new_in("/dev/shm").expect("RAM file in /dev/shm");
        file.as_file().set_len(4 * PAGE_BYTES).expect("size");
        file.as_file()
            .write_all_at(&[7; PAGE], 2 * PAGE_BYTES)
            .expect("page 2 holds data");
        let ram = Arc::new(file.reopen().expect("reopen"));
        let data = [[0; PAGE], [5; PAGE], [0; PAGE]].concat();

        write_pages(ram, 4 * PAGE_BYTES, vec![0, 1, 2], data)
            .await
            .expect("write pages");

        let file = file.as_file();
        assert!(
            is_hole(file, 0).expect("page 0"),
            "a zero page filled a hole"
        );
        assert!(!is_hole(file, PAGE_BYTES).expect("page 1"));
        let mut page = [1; PAGE];
        file.read_exact_at(&mut page, 2 * PAGE_BYTES).expect("read");
        assert!(is_zero(&page), "zeros must overwrite data");
        file.read_exact_at(&mut page, PAGE_BYTES).expect("read");
        assert_eq!(page, [5; PAGE]);
    }
}
