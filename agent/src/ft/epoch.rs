//! The epoch loop, the heart of FT: checkpoints a running primary to its standby.
//!
//! Each epoch the guest runs for the interval, then pauses for the checkpoint:
//! `stop` → device state saved (`xen-save-devices-state`: the devices only, no RAM) → RAM
//! pages changed since the last pass found ([`super::dirty`]) → pages and device state sent
//! → the standby applies the epoch (RAM, held disk writes, device state) and acknowledges →
//! `cont`. When an epoch dirtied many pages, the next interval pre-copies: pages changed so far
//! are found and sent while the guest runs, so the pause has only the rest to send. Whatever
//! fails, the guest is resumed: a failed epoch ends the loop, and the VM runs on unprotected
//! (simplex) until it is protected anew.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, watch};

use std::sync::Arc;

use super::dirty::{self, Dirty, DirtyTracker};
use super::netbuf::NetBuffers;
use super::output::{self, Mark, OutputGate};
use super::qmp::{self, Qmp};
use super::ramblocks;
use super::state_delta::Delta;
use super::wire::{self, Message, PAGES_PER_MESSAGE};

/// Longest the guest may wait to be resumed after a checkpoint before the loop reports it
/// stuck.
const RESUME_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a QEMU whose QMP socket failed may take to exit before it counts as alive.
const EXIT_WAIT: Duration = Duration::from_secs(2);

/// Errors of the epoch loop; each one ends the loop with the guest running.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// QEMU refused or failed a command.
    #[error("QMP")]
    Qmp(#[from] qmp::Error),
    /// Finding the dirty pages failed.
    #[error("finding the changed RAM pages")]
    Dirty(#[from] dirty::Error),
    /// The stream to the standby failed.
    #[error("the FT stream to the standby")]
    Wire(#[from] wire::Error),
    /// The standby's socket could not be reached.
    #[error("connecting to the standby's FT socket {path}")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A NIC of the guest has no filter to hold its frames (a domain defined before FT held
    /// network output): checkpointing it would let observers see frames a failover undoes.
    #[error(
        "the guest has {nics} NICs but only {filters} hold their frames until commit: power the VM off and start it again to define them"
    )]
    Unguarded {
        /// NICs of the guest.
        nics: usize,
        /// Filters found.
        filters: usize,
    },
    /// The standby's RAM is not the primary's size: they are not the same VM shape.
    #[error("the standby's RAM is {standby} bytes, the primary's {primary}")]
    RamSize {
        /// The primary's RAM bytes.
        primary: u64,
        /// The standby's RAM bytes.
        standby: u64,
    },
    /// The device state file could not be read back.
    #[error("reading the saved device state {path}")]
    ReadState {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The guest has RAM that a checkpoint would not carry.
    #[error("checking the guest's RAM")]
    RamBlocks(#[from] ramblocks::Error),
    /// The standby refused the epoch.
    #[error("the standby refused epoch {epoch}: {reason}")]
    Refused {
        /// The epoch.
        epoch: u64,
        /// Its reason.
        reason: String,
    },
    /// The standby answered out of turn.
    #[error("the standby answered {answer} to epoch {epoch}")]
    Unexpected {
        /// The epoch.
        epoch: u64,
        /// What came back.
        answer: String,
    },
    /// The checkpoint did not complete within the commit timeout.
    #[error("epoch {epoch} did not commit within {timeout:?}")]
    Timeout {
        /// The epoch.
        epoch: u64,
        /// The limit.
        timeout: Duration,
    },
    /// The serial output gate failed.
    #[error("the serial output gate")]
    Output(#[from] output::Error),
    /// The hashing task died.
    #[error("the dirty-page scan task failed: {0}")]
    ScanTask(String),
    /// The guest's QEMU died: the epochs ended with it, and its standby holds the last
    /// committed epoch, which a failover resumes.
    #[error("the guest's QEMU died after epoch {epoch} committed")]
    QemuDied {
        /// The last committed epoch.
        epoch: u64,
        /// What the loop saw.
        #[source]
        source: Box<Error>,
    },
}

/// How a VM's epochs run.
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    /// Guest run time between checkpoints.
    pub interval: Duration,
    /// Pre-copy during the next interval when an epoch sent more pages than this.
    pub precopy_over_pages: usize,
    /// Longest a checkpoint may keep the guest paused before it is abandoned.
    pub commit_timeout: Duration,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            interval: Duration::from_millis(50),
            precopy_over_pages: 256,
            commit_timeout: Duration::from_secs(3),
        }
    }
}

/// Where one pause went.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Phases {
    /// `stop`.
    pub stop: Duration,
    /// Reading the guest's output up to the checkpoint (output commit).
    pub output: Duration,
    /// Device state saved and read back.
    pub save: Duration,
    /// Finding the changed pages; runs beside `save`, so the two overlap.
    pub scan: Duration,
    /// Sending pages and device state.
    pub send: Duration,
    /// Waiting for the standby to apply and acknowledge.
    pub ack: Duration,
    /// Sending the committed epoch's network frames (`netbuf.rs`).
    pub net: Duration,
    /// `cont`.
    pub cont: Duration,
}

/// One committed epoch.
#[derive(Clone, Debug)]
pub struct EpochReport {
    /// Its number (1 is the first, after the full copy).
    pub epoch: u64,
    /// How long the guest was paused.
    pub pause: Duration,
    /// Where the pause went.
    pub phases: Phases,
    /// Pages sent during the pause.
    pub dirty_pages: usize,
    /// Pages sent by the pre-copy before it, while the guest ran.
    pub precopied_pages: usize,
    /// Bytes of device state.
    pub state_bytes: usize,
    /// Bytes of device state sent: all of it, or the changed blocks of a delta against the
    /// last acknowledged state ([`super::state_delta`]).
    pub state_sent: usize,
    /// How long each serial line the epoch released was held ([`OutputGate::release`]).
    pub output_delays: Vec<Duration>,
}

/// What the paused part of a checkpoint gives: its phases, the pages sent, the device state's
/// bytes and those sent, and the output mark it released up to.
type Captured = (Phases, usize, (usize, usize), Option<Mark>);

/// A tracker pass running on a blocking thread: the tracker, its pages, how long it took.
type Scanning =
    tokio::task::JoinHandle<(Box<dyn DirtyTracker>, Result<Dirty, dirty::Error>, Duration)>;

/// A primary checkpointing to its standby.
#[derive(Debug)]
pub struct Primary {
    vm: String,
    qmp: Qmp,
    qmp_socket: PathBuf,
    tracker: Option<Box<dyn DirtyTracker>>,
    stream: UnixStream,
    state_file: PathBuf,
    epoch: u64,
    precopied: usize,
    /// The device state of the last epoch the standby acknowledged, the base of the next
    /// delta; `None` until the first acknowledgement of this stream.
    acked_state: Option<(u64, Vec<u8>)>,
    output: Option<Arc<OutputGate>>,
    /// The filters holding the guest's network frames until their epoch commits.
    nets: NetBuffers,
    pid: u32,
    /// Records the standby as stale (fenced, in etcd) before a guest whose epochs ended lets
    /// its output out: after that, resuming the standby would undo what observers saw.
    invalidate: Option<Invalidate>,
}

/// The hook that records a standby stale ([`Primary::invalidate_with`]).
struct Invalidate(replicator::proxy::Hold);

impl std::fmt::Debug for Invalidate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Invalidate")
    }
}

impl Primary {
    /// Connects to `vm`'s QEMU (QMP socket `qmp_socket`, process `pid`, RAM file `ram`) and
    /// to its standby through `standby_socket`; device states are saved under `state_dir`.
    pub async fn connect(
        vm: &str,
        qmp_socket: &Path,
        pid: u32,
        ram: &Path,
        standby_socket: &Path,
        state_dir: &Path,
    ) -> Result<Primary, Error> {
        let mut qmp = Qmp::connect(qmp_socket).await?;
        let nets = NetBuffers::discover(&mut qmp).await?;
        let nics = NetBuffers::guest_nics(&mut qmp).await?;
        if nics > nets.len() {
            return Err(Error::Unguarded {
                nics,
                filters: nets.len(),
            });
        }
        // Half the cores at most: the guests, etcd and the agent's own lease renewal must keep
        // running while a pause hashes all of RAM.
        let threads =
            std::thread::available_parallelism().map_or(1, |n| (usize::from(n) / 2).max(1));
        let tracker = dirty::tracker_for(pid, ram, threads)?;
        let primary_bytes = std::fs::metadata(ram)
            .map_err(|source| Error::ReadState {
                path: ram.to_path_buf(),
                source,
            })?
            .len();
        ramblocks::check_shared(&mut qmp, primary_bytes).await?;
        let mut stream = UnixStream::connect(standby_socket)
            .await
            .map_err(|source| Error::Connect {
                path: standby_socket.to_path_buf(),
                source,
            })?;
        wire::write(&mut stream, &Message::Hello { vm: vm.to_string() }).await?;
        let committed = match wire::read(&mut stream).await? {
            Message::Welcome {
                ram_bytes,
                committed,
            } if ram_bytes == primary_bytes => committed,
            Message::Welcome { ram_bytes, .. } => {
                return Err(Error::RamSize {
                    primary: primary_bytes,
                    standby: ram_bytes,
                });
            }
            other => {
                return Err(Error::Unexpected {
                    epoch: 0,
                    answer: format!("{other:?}"),
                });
            }
        };
        tracing::info!(
            vm,
            tracker = tracker.name(),
            nics = nets.len(),
            ram_bytes = primary_bytes,
            standby_committed = committed,
            "FT primary connected to its standby"
        );
        Ok(Primary {
            vm: vm.to_string(),
            qmp,
            qmp_socket: qmp_socket.to_path_buf(),
            tracker: Some(tracker),
            stream,
            state_file: state_dir.join(format!("{vm}.ft-save")),
            epoch: committed,
            precopied: 0,
            acked_state: None,
            output: None,
            nets,
            pid,
            invalidate: None,
        })
    }

    /// Runs `invalidate` (it returns once the standby is recorded stale) before the output of
    /// a guest whose epochs ended is released.
    pub fn invalidate_with(mut self, invalidate: replicator::proxy::Hold) -> Primary {
        self.invalidate = Some(Invalidate(invalidate));
        self
    }

    /// Holds the guest's serial output in `gate` until the epoch that produced it commits.
    pub async fn hold_output(mut self, gate: Arc<OutputGate>) -> Primary {
        gate.close().await;
        self.output = Some(gate);
        self
    }

    /// After the last epoch: if the guest still runs (unprotected now), records the standby
    /// stale, then lets its held output (serial and network) out and passes the rest through;
    /// if its QEMU died (`gone`), drops the output of the uncommitted epoch, which the standby
    /// writes again if it takes over (QEMU's held frames die with it).
    async fn settle_output(&mut self, gone: bool) {
        if self.output.is_none() && self.nets.is_empty() {
            return;
        }
        if gone {
            self.drop_output().await;
            return;
        }
        if let Some(invalidate) = &self.invalidate {
            tracing::warn!(vm = %self.vm, "FT: the standby's checkpoint is stale now; recording it before the guest's output is released");
            (invalidate.0)().await;
            if !alive(self.pid) {
                // It died while the mark was written: the pair may already have resumed the
                // standby, which writes this output again.
                self.drop_output().await;
                return;
            }
        }
        if let Some(gate) = &self.output
            && let Err(e) = gate.open().await
        {
            tracing::warn!(vm = %self.vm, error = %daemon::error_chain(&e), "FT: releasing the held serial output failed");
        }
        self.open_nets().await;
    }

    /// Drops the output a dead QEMU left held (its standby writes it again if it takes over)
    /// and lets whatever QEMU uses the gate next write through until epochs hold it again.
    async fn drop_output(&self) {
        let Some(gate) = &self.output else {
            return;
        };
        let dropped = gate.discard().await;
        tracing::info!(vm = %self.vm, dropped_bytes = dropped, "FT: the guest's QEMU is gone; its uncommitted output is dropped");
        if let Err(e) = gate.open().await {
            tracing::warn!(vm = %self.vm, error = %daemon::error_chain(&e), "FT: reopening the serial gate failed");
        }
    }

    /// Lets the guest's network frames flow again; a QMP connection a failure left out of step
    /// is replaced once.
    async fn open_nets(&mut self) {
        if self.nets.is_empty() || self.nets.open(&mut self.qmp).await.is_ok() {
            return;
        }
        let reopened = match self.reconnect().await {
            Ok(()) => self.nets.open(&mut self.qmp).await.map_err(Error::from),
            Err(e) => Err(e),
        };
        match reopened {
            Ok(()) => {
                tracing::info!(vm = %self.vm, "FT: the guest's network frames flow unheld again")
            }
            Err(e) => {
                tracing::error!(vm = %self.vm, error = %daemon::error_chain(&e), "FT: the guest's network frames stay held: switch its ft-net filters off by hand (QMP qom-set status off)")
            }
        }
    }

    /// The last committed epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Finds and sends the pages changed so far while the guest runs; answers how many (0
    /// when the tracker cannot run beside the guest: the pause then sends everything).
    pub async fn precopy(&mut self) -> Result<usize, Error> {
        if !self.tracker.as_ref().is_some_and(|t| t.runs_with_guest()) {
            return Ok(0);
        }
        let dirty = self.scan().await?;
        self.send_pages(&dirty).await?;
        self.precopied += dirty.len();
        Ok(dirty.len())
    }

    /// Takes one checkpoint; the guest runs again when this returns, whatever the outcome.
    pub async fn checkpoint(&mut self, timeout: Duration) -> Result<EpochReport, Error> {
        let epoch = self.epoch + 1;
        let started = Instant::now();
        if let Err(e) = self.qmp.execute("stop", Value::Null).await {
            // The stop may have taken effect without its reply reaching us.
            if let Err(stuck) = self.resume().await {
                tracing::error!(vm = %self.vm, epoch, error = %daemon::error_chain(&stuck), "FT: stopping the guest for a checkpoint failed, and then it could not be resumed");
            }
            return Err(e.into());
        }
        let stopped = started.elapsed();
        let captured = tokio::time::timeout(timeout, self.capture(epoch)).await;
        let captured = match captured {
            Ok(captured) => captured,
            Err(_) => {
                // Cut off mid-command: the reply still on its way would answer the next one.
                if let Err(e) = self.reconnect().await {
                    tracing::warn!(vm = %self.vm, error = %daemon::error_chain(&e), "FT: reconnecting QMP after a timed-out checkpoint failed");
                }
                Err(Error::Timeout { epoch, timeout })
            }
        };
        // The epoch committed: its frames leave while the guest is still stopped, so that none of
        // the next epoch's go with them.
        let releasing = Instant::now();
        let net_released = match &captured {
            Ok(_) => self.nets.release(&mut self.qmp).await,
            Err(_) => Ok(()),
        };
        let net = releasing.elapsed();
        if let Err(e) = &net_released
            && self.invalidate.is_some()
            && !self.wait_gone(socket_failed(e)).await
            && let Some(invalidate) = &self.invalidate
        {
            // A filter left off lets the next epoch's frames out as soon as the guest runs:
            // the standby must be recorded stale before then. (A QEMU that died took its
            // frames with it, and its standby stays good.)
            tracing::warn!(vm = %self.vm, epoch, "FT: releasing the epoch's frames failed; recording the standby stale before the guest resumes");
            (invalidate.0)().await;
        }
        let resuming = Instant::now();
        let resumed = self.resume().await;
        let cont = resuming.elapsed();
        let pause = started.elapsed();
        let (mut phases, dirty_pages, (state_bytes, state_sent), mark) = match captured {
            Ok(captured) => captured,
            Err(e) => {
                if let Err(stuck) = &resumed {
                    tracing::error!(vm = %self.vm, epoch, error = %daemon::error_chain(stuck), "FT checkpoint failed, and then the guest could not be resumed");
                }
                return Err(e);
            }
        };
        // The epoch committed: its output is the guest's for good, whatever happens next.
        let output_delays = match (&self.output, mark) {
            (Some(gate), Some(mark)) => gate.release(mark).await?,
            _ => Vec::new(),
        };
        self.epoch = epoch;
        net_released?;
        resumed?;
        phases.stop = stopped;
        phases.net = net;
        phases.cont = cont;
        let precopied_pages = std::mem::take(&mut self.precopied);
        Ok(EpochReport {
            epoch,
            pause,
            phases,
            dirty_pages,
            precopied_pages,
            state_bytes,
            state_sent,
            output_delays,
        })
    }

    /// The paused part of a checkpoint: cut the output, save, scan, send, wait for the
    /// acknowledgement.
    async fn capture(&mut self, epoch: u64) -> Result<Captured, Error> {
        let mut phases = Phases::default();
        let at = Instant::now();
        let mark = match &self.output {
            Some(gate) => Some(gate.cut().await?),
            None => None,
        };
        phases.output = at.elapsed();
        // The scan reads only guest RAM, which neither the stopped guest nor the device-state
        // save (RAM is excluded) writes: it runs beside QEMU's save, on another core.
        let helpers = self.tracker.as_ref().and_then(|t| t.helpers());
        let scanning = self.spawn_scan()?;
        let at = Instant::now();
        let saved = self.save().await;
        phases.save = at.elapsed();
        if let Some(helpers) = helpers {
            // QEMU's save is done and its core free: it takes on what is left of the scan.
            let _ = tokio::task::spawn_blocking(move || helpers.help()).await;
        }
        let (scanned, scan_took) = self.join_scan(scanning).await?;
        phases.scan = scan_took;
        let (device_state, dirty) = (saved?, scanned?);
        let at = Instant::now();
        self.send_pages(&dirty).await?;
        let state_bytes = device_state.len();
        let delta = self
            .acked_state
            .take()
            .and_then(|(base, old)| Delta::between(base, &old, &device_state));
        let (state_sent, commit) = match delta {
            Some(delta) => (delta.carried(), Message::CommitDelta { epoch, delta }),
            None => (
                state_bytes,
                Message::Commit {
                    epoch,
                    device_state: device_state.clone(),
                },
            ),
        };
        wire::write(&mut self.stream, &commit).await?;
        phases.send = at.elapsed();
        let at = Instant::now();
        match wire::read(&mut self.stream).await? {
            Message::Ack { epoch: acked } if acked == epoch => {
                self.acked_state = Some((epoch, device_state));
            }
            Message::Nack { reason, .. } => return Err(Error::Refused { epoch, reason }),
            other => {
                return Err(Error::Unexpected {
                    epoch,
                    answer: format!("{other:?}"),
                });
            }
        }
        phases.ack = at.elapsed();
        Ok((phases, dirty.len(), (state_bytes, state_sent), mark))
    }

    /// A fresh QMP connection, in place of one whose replies may be out of step (closed
    /// first: QEMU greets one client at a time).
    async fn reconnect(&mut self) -> Result<(), Error> {
        self.qmp.close().await;
        self.qmp = Qmp::connect(&self.qmp_socket).await?;
        Ok(())
    }

    /// Resumes the guest whatever state the checkpoint left it in ([`Qmp::resume`]). A QMP
    /// connection that failed (a reply timed out and would answer the next command, or the
    /// socket broke) is replaced once while QEMU still runs: a live guest never stays paused
    /// because of our connection.
    async fn resume(&mut self) -> Result<(), Error> {
        let first = match self.qmp.resume(RESUME_TIMEOUT).await {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        if self.wait_gone(socket_failed(&first)).await {
            return Err(first.into());
        }
        tracing::warn!(vm = %self.vm, error = %daemon::error_chain(&first), "FT: resuming the guest failed; retrying on a new QMP connection");
        self.reconnect().await?;
        self.qmp.resume(RESUME_TIMEOUT).await?;
        tracing::info!(vm = %self.vm, "FT: the guest runs again after a retried resume");
        Ok(())
    }

    /// Whether the guest's QEMU is gone after the loop ended with `ended`.
    async fn qemu_gone(&self, ended: Option<&Error>) -> bool {
        let socket_failed = matches!(ended, Some(Error::Qmp(e)) if socket_failed(e));
        self.wait_gone(socket_failed).await
    }

    /// Whether the guest's QEMU is gone. A failure on its QMP socket (`socket_failed`) usually
    /// means it died, but the socket closes a moment before the process exits: wait for the
    /// exit, and if QEMU outlives the wait, only our connection failed.
    async fn wait_gone(&self, socket_failed: bool) -> bool {
        if !socket_failed {
            return !alive(self.pid);
        }
        let deadline = Instant::now() + EXIT_WAIT;
        while alive(self.pid) {
            if Instant::now() > deadline {
                tracing::warn!(vm = %self.vm, pid = self.pid, "FT: QEMU's QMP socket failed but QEMU still runs");
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }

    /// Saves the device state into the state file and reads it back. QEMU writes it in one
    /// go from its main loop (`live`: the disks stay active, the guest resumes after); a
    /// migration to a file would add its setup and a JSON description of every device.
    async fn save(&mut self) -> Result<Vec<u8>, Error> {
        let filename = self.state_file.to_string_lossy();
        self.qmp
            .execute(
                "xen-save-devices-state",
                json!({ "filename": filename, "live": true }),
            )
            .await?;
        tokio::fs::read(&self.state_file)
            .await
            .map_err(|source| Error::ReadState {
                path: self.state_file.clone(),
                source,
            })
    }

    /// Runs the tracker off the async runtime (it hashes the whole RAM).
    async fn scan(&mut self) -> Result<Dirty, Error> {
        let scanning = self.spawn_scan()?;
        let (dirty, _) = self.join_scan(scanning).await?;
        Ok(dirty?)
    }

    /// Starts a pass of the tracker on a blocking thread; [`Primary::join_scan`] gives the
    /// tracker back.
    fn spawn_scan(&mut self) -> Result<Scanning, Error> {
        let Some(mut tracker) = self.tracker.take() else {
            return Err(Error::ScanTask("an earlier scan did not return".into()));
        };
        Ok(tokio::task::spawn_blocking(move || {
            let at = Instant::now();
            let dirty = tracker.scan();
            (tracker, dirty, at.elapsed())
        }))
    }

    /// Waits for a pass started by [`Primary::spawn_scan`], keeps its tracker and answers its
    /// pages and how long it took.
    async fn join_scan(
        &mut self,
        scanning: Scanning,
    ) -> Result<(Result<Dirty, dirty::Error>, Duration), Error> {
        let (tracker, dirty, took) = scanning.await.map_err(|e| Error::ScanTask(e.to_string()))?;
        self.tracker = Some(tracker);
        Ok((dirty, took))
    }

    async fn send_pages(&mut self, dirty: &Dirty) -> Result<(), Error> {
        for (pages, data) in dirty
            .pages
            .chunks(PAGES_PER_MESSAGE)
            .zip(dirty.data.chunks(PAGES_PER_MESSAGE * dirty::PAGE))
        {
            let message = Message::Pages {
                pages: pages.to_vec(),
                data: data.to_vec(),
            };
            wire::write(&mut self.stream, &message).await?;
        }
        Ok(())
    }
}

/// Runs `primary`'s epochs until `stop` turns true (answers the last committed epoch) or an
/// epoch fails (the guest runs on unprotected). The first pass copies all of RAM while the
/// guest runs. Each committed epoch is sent on `reports`.
pub async fn run(
    mut primary: Primary,
    settings: Settings,
    mut stop: watch::Receiver<bool>,
    reports: mpsc::UnboundedSender<EpochReport>,
) -> Result<u64, Error> {
    let vm = primary.vm.clone();
    let outcome = epochs(&mut primary, settings, &mut stop, &reports).await;
    let gone = primary.qemu_gone(outcome.as_ref().err()).await;
    let epoch = primary.epoch();
    match &outcome {
        Err(e) if gone => {
            tracing::warn!(vm, epoch, error = %daemon::error_chain(e), "FT epochs ended: the guest's QEMU died; its standby holds the last committed epoch");
        }
        Err(e) => {
            tracing::error!(vm, epoch = epoch + 1, error = %daemon::error_chain(e), "FT epoch failed: the guest runs on unprotected");
        }
        Ok(_) => {}
    }
    primary.settle_output(gone).await;
    outcome.map_err(|e| {
        if gone {
            Error::QemuDied {
                epoch,
                source: Box::new(e),
            }
        } else {
            e
        }
    })
}

async fn epochs(
    primary: &mut Primary,
    settings: Settings,
    stop: &mut watch::Receiver<bool>,
    reports: &mpsc::UnboundedSender<EpochReport>,
) -> Result<u64, Error> {
    primary.nets.hold(&mut primary.qmp).await?;
    let started = Instant::now();
    let copied = primary.precopy().await?;
    tracing::info!(vm = %primary.vm, pages = copied, ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX), "FT initial RAM copy sent");
    loop {
        if *stop.borrow() {
            return Ok(primary.epoch());
        }
        let report = primary.checkpoint(settings.commit_timeout).await?;
        let next = tokio::time::Instant::now() + settings.interval;
        let precopy = report.dirty_pages > settings.precopy_over_pages;
        let _ = reports.send(report);
        if precopy {
            primary.precopy().await?;
        }
        tokio::select! {
            () = tokio::time::sleep_until(next) => {}
            _ = stop.changed() => {}
        }
    }
}

/// Whether a QMP failure is of the socket itself (QEMU closed it, or it cannot be reached),
/// as when QEMU dies.
fn socket_failed(e: &qmp::Error) -> bool {
    matches!(e, qmp::Error::Io { .. } | qmp::Error::Connect { .. })
}

/// Whether process `pid` still runs (not gone, not a zombie).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit(')')
            .next()
            .is_some_and(|rest| !rest.trim_start().starts_with('Z'))
    })
}
