//! The service's FT side: `PrepareStandby` (a standby QEMU over the replica volumes, fed by
//! the peer's epochs), `StartEpochs` (the epoch loop of a running primary, begun once its
//! disks' mirrors are in sync), the start of a VM whose committed standby is here (resumed,
//! not booted), and the FT status in listings. The data path itself is [`crate::ft`].

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use proto::agent as pb;
use tokio::sync::{mpsc, watch};

use super::{Error, Inner, invalid, status_to_pb, uuid_invalid};
use crate::domain::{self, FtDomain};
use crate::ft::epoch::{self, Primary, Settings};
use crate::ft::histogram::{self, Histogram};
use crate::ft::output::OutputGate;
use crate::ft::qmp::Qmp;
use crate::libvirt::{DomainState, DomainStatus};
use crate::mirror::{self, MirrorState};
use crate::serial;

/// Longest a standby QEMU may take from start to its QMP socket answering.
const STANDBY_QMP_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest a probe of a QEMU's run state may take.
const ORPHAN_PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// QEMU run states a checkpoint leaves its guest in: stopped, device state saving or saved.
const CHECKPOINT_STATES: [&str; 3] = ["paused", "finish-migrate", "postmigrate"];
/// Longest the resume of a guest left stopped mid-checkpoint may take.
const ORPHAN_RESUME_TIMEOUT: Duration = Duration::from_secs(10);
/// How recent the last commit of a running epoch loop must be for a pause of its guest to
/// count as a checkpoint's: the commit timeout (3 s) and an interval, with room to spare.
const CHECKPOINT_PAUSE_MS: u64 = 5_000;

/// Now, in ms since the Unix epoch.
fn unix_ms() -> u64 {
    u64::try_from(daemon::now_unix_ms()).unwrap_or(0)
}
/// How often a primary waiting for its mirrors looks at them.
const MIRROR_POLL: Duration = Duration::from_millis(500);

/// One primary's epoch loop and what it reports.
#[derive(Debug)]
struct Run {
    committed: AtomicU64,
    /// When the last epoch committed (ms since the Unix epoch; 0 before the first).
    committed_at_ms: AtomicU64,
    last_pause_us: AtomicU64,
    pauses: Histogram,
    epochs: Histogram,
    waiting: AtomicBool,
    ended: AtomicBool,
    error: Mutex<String>,
    stop: Mutex<Option<watch::Sender<bool>>>,
}

impl Default for Run {
    fn default() -> Run {
        Run {
            committed: AtomicU64::new(0),
            committed_at_ms: AtomicU64::new(0),
            last_pause_us: AtomicU64::new(0),
            pauses: Histogram::new(histogram::PAUSE_BOUNDS_US),
            epochs: Histogram::new(histogram::EPOCH_BOUNDS_US),
            waiting: AtomicBool::new(false),
            ended: AtomicBool::new(false),
            error: Mutex::new(String::new()),
            stop: Mutex::new(None),
        }
    }
}

impl Run {
    fn fail(&self, reason: String) {
        *self.error.lock().unwrap_or_else(PoisonError::into_inner) = reason;
        self.ended.store(true, Ordering::SeqCst);
    }
}

/// The agent's FT state: serial gates and epoch loops by VM.
#[derive(Debug, Default)]
pub(crate) struct FtRuns {
    gates: Mutex<BTreeMap<String, Arc<OutputGate>>>,
    runs: Mutex<BTreeMap<String, Arc<Run>>>,
}

impl FtRuns {
    fn gate(&self, uuid: &str) -> Option<Arc<OutputGate>> {
        self.gates
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(uuid)
            .cloned()
    }

    fn run(&self, uuid: &str) -> Option<Arc<Run>> {
        self.runs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(uuid)
            .cloned()
    }

    /// Ends `uuid`'s epoch loop, if one runs (its domain stops or goes).
    pub(crate) fn stop(&self, uuid: &str) {
        let run = self
            .runs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(uuid);
        if let Some(run) = run
            && let Some(stop) = run
                .stop
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take()
        {
            let _ = stop.send(true);
        }
    }
}

impl Inner {
    /// The FT sockets of domain `uuid`: QMP and the serial gate, in the state directory.
    pub(super) fn ft_domain(&self, uuid: &str, standby: bool) -> FtDomain {
        let dir = self.ft_dir();
        FtDomain {
            qmp_socket: dir.join(format!("{uuid}.qmp")),
            serial_socket: dir.join(format!("{uuid}.serial")),
            standby,
        }
    }

    fn ft_dir(&self) -> PathBuf {
        self.state_dir.join("ft")
    }

    /// Makes sure `uuid`'s serial gate listens (before its QEMU starts); output flows through
    /// until epochs hold it.
    pub(super) fn ensure_gate(&self, uuid: &str) -> Result<Arc<OutputGate>, Error> {
        let mut gates = self.ft.gates.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(gate) = gates.get(uuid) {
            return Ok(gate.clone());
        }
        let dir = self.ft_dir();
        std::fs::create_dir_all(&dir).map_err(|source| Error::FtDir {
            path: dir.clone(),
            source,
        })?;
        let socket = dir.join(format!("{uuid}.serial"));
        let log = serial::log_path(&self.serial_dir, uuid);
        let gate = Arc::new(OutputGate::listen(&socket, &log, true)?);
        gates.insert(uuid.to_string(), gate.clone());
        Ok(gate)
    }

    /// Starts `uuid` where a standby of it waits: resumes the standby from its last committed
    /// checkpoint (`Some`) when the pair says it may (`resume`: it saw that standby
    /// checkpointed for the run that died); otherwise stops it so that a plain boot follows
    /// (`None`). `None` too when there is no standby here.
    pub(super) async fn start_from_standby(
        &self,
        uuid: &str,
        resume: bool,
        generation: u64,
    ) -> Result<Option<DomainStatus>, Error> {
        let Some(replicas) = &self.deps.replicas else {
            return Ok(None);
        };
        let standbys = replicas.standbys();
        let Some(committed) = standbys.committed(uuid).await else {
            if self.orphan_standby(uuid).await {
                tracing::warn!(vm = uuid, node = %self.node, "a standby QEMU this agent does not know (it outlived an agent restart) waits here: stopping it, the VM boots from its disks");
                self.deps.libvirt.destroy(uuid).await?;
            }
            return Ok(None);
        };
        if committed == 0 || !resume {
            tracing::warn!(vm = uuid, node = %self.node, committed, resume, "FT standby not resumed (no checkpoint, or none the pair saw for this run): booting the VM from its disks instead");
            standbys.remove(uuid).await;
            self.deps.libvirt.destroy(uuid).await?;
            return Ok(None);
        }
        tracing::info!(vm = uuid, node = %self.node, epoch = committed, "failover begin: resuming the FT standby from its last checkpoint");
        let activated = standbys.activate(uuid, &self.ft_dir()).await;
        standbys.remove(uuid).await;
        match activated {
            Ok(done) => {
                tracing::info!(vm = uuid, node = %self.node, epoch = done.epoch, dropped_writes = done.dropped_writes, load_ms = done.load.as_secs_f64() * 1e3, "failover end: ok, the guest runs on from its checkpoint");
                // The run is the failover's now: a restarted agent tells it by its generation.
                if let Err(e) = self.deps.libvirt.set_generation(uuid, generation).await {
                    tracing::warn!(vm = uuid, node = %self.node, generation, error = %daemon::error_chain(&e), "recording the resumed run's generation failed; a restarted agent leaves it stopped");
                }
                Ok(Some(self.deps.libvirt.status(uuid).await?))
            }
            Err(e) => {
                tracing::error!(vm = uuid, node = %self.node, error = %daemon::error_chain(&e), "failover end: failed; booting the VM from its disks instead");
                self.deps.libvirt.destroy(uuid).await?;
                Ok(None)
            }
        }
    }

    /// Whether `uuid`'s domain running here is a run of an older generation than
    /// `generation`, a standby's command, whose output can no longer flow: its epochs died
    /// with an earlier agent, or etcd refused its stale mark. The pair moved the VM to the
    /// peer since (an FT takeover of this host while it was unreachable), so such a run gives
    /// way to the standby. A run whose epochs this agent still drives never does.
    async fn superseded(&self, uuid: &str, generation: u64) -> bool {
        let driven = self
            .ft
            .run(uuid)
            .is_some_and(|r| !r.ended.load(Ordering::SeqCst));
        let refused = self.deps.marker.as_ref().is_some_and(|m| m.refused(uuid));
        if driven && !refused {
            return false;
        }
        match self.deps.libvirt.generation(uuid).await {
            Ok(Some(run)) if run < generation => {
                tracing::warn!(vm = uuid, node = %self.node, run, generation, "FT standby: the domain running here is a run of generation {run}, which the pair moved to the peer at generation {generation}; destroying it (its output stays held for good)");
                true
            }
            _ => false,
        }
    }

    /// The PID of `uuid`'s QEMU and the RAM file it maps.
    async fn qemu_ram(&self, uuid: &str) -> Result<(u32, PathBuf), Error> {
        let pid = self
            .deps
            .libvirt
            .qemu_pid(uuid)
            .await
            .and_then(|(pid, _)| u32::try_from(pid).ok())
            .ok_or_else(|| Error::Standby {
                vm: uuid.to_string(),
                reason: "its QEMU's PID is unknown".into(),
            })?;
        Ok((pid, crate::ft::ram_file(pid)?))
    }

    /// Whether `uuid` runs here as a standby QEMU (waiting for a device state) that no
    /// registration describes: its state lived in an agent that restarted since.
    async fn orphan_standby(&self, uuid: &str) -> bool {
        let socket = self.ft_domain(uuid, true).qmp_socket;
        let probe = async {
            let mut qmp = Qmp::connect(&socket).await.ok()?;
            qmp.status().await.ok()
        };
        let status = tokio::time::timeout(ORPHAN_PROBE_TIMEOUT, probe).await;
        matches!(status, Ok(Some(s)) if s == "inmigrate")
    }

    /// `PrepareStandby`: a standby QEMU of the VM waiting for the peer's checkpoints.
    pub(super) async fn prepare_standby(
        &self,
        request: pb::DefineDomainRequest,
    ) -> Result<pb::DomainStatus, Error> {
        let spec = request
            .spec
            .ok_or_else(|| invalid("the request has no spec"))?;
        if !spec.ft {
            return Err(invalid("a standby is for FT VMs only (spec.ft is false)"));
        }
        let generation = super::generation_of(request.fence);
        let mut spec = self.resolve(spec, generation)?;
        let uuid = spec.uuid.clone();
        self.admit("prepare-standby", &uuid, request.fence)?;
        let replicas = self.replicas("prepare-standby")?;
        tracing::info!(vm = %uuid, node = %self.node, "FT standby begin");
        // A primary run of this VM here that ended (its QEMU died and the VM moved to the
        // peer) is forgotten: this host's FT side of it is the standby from now on.
        if self
            .ft
            .run(&uuid)
            .is_some_and(|run| run.ended.load(Ordering::SeqCst))
        {
            self.ft.stop(&uuid);
        }
        let standbys = replicas.standbys();
        let libvirt = &self.deps.libvirt;
        let current = libvirt.status(&uuid).await;
        let running = current
            .as_ref()
            .is_ok_and(|s| matches!(s.state, DomainState::Running | DomainState::Paused));
        if running {
            let standby =
                standbys.committed(&uuid).await.is_some() || self.orphan_standby(&uuid).await;
            if !standby {
                if !self.superseded(&uuid, generation).await {
                    return Err(Error::Libvirt(crate::libvirt::Error::DomainRunning {
                        uuid: uuid.clone(),
                    }));
                }
                // Its epochs, if this agent still runs them, are for a run that is gone.
                self.ft.stop(&uuid);
            }
            // An older standby (known, or one that outlived an agent restart): a fresh one
            // replaces it.
            standbys.remove(&uuid).await;
            libvirt.destroy(&uuid).await?;
        }
        let applied = replicas.settle_epochs(&uuid).await?;
        if applied > 0 {
            tracing::info!(vm = %uuid, node = %self.node, writes = applied, "FT: writes held for an epoch that never committed applied to the replica (its primary lives on)");
        }
        self.ensure_gate(&uuid)?;
        let ft = self.ft_domain(&uuid, true);
        spec.ft = Some(ft.clone());
        libvirt
            .define(&uuid, domain::domain_xml(&spec, &self.host))
            .await?;
        let started = libvirt.start_paused(&uuid).await?;
        // The definition a later cold start uses boots normally.
        spec.ft = Some(FtDomain {
            standby: false,
            ..ft.clone()
        });
        libvirt
            .define(&uuid, domain::domain_xml(&spec, &self.host))
            .await?;
        let mut qmp = Qmp::connect_within(&ft.qmp_socket, STANDBY_QMP_TIMEOUT).await?;
        let status = qmp.status().await?;
        if status != "inmigrate" {
            return Err(Error::Standby {
                vm: uuid,
                reason: format!("its QEMU is {status}, not waiting for a checkpoint"),
            });
        }
        let (_, ram) = self.qemu_ram(&uuid).await?;
        standbys.add(&uuid, &ram, &ft.qmp_socket, replicas.exports_of(&uuid))?;
        tracing::info!(vm = %uuid, node = %self.node, ram = %ram.display(), "FT standby end: ok, waiting for checkpoints");
        Ok(status_to_pb(started))
    }

    /// `StartEpochs`: the epoch loop of the running primary, begun in the background once its
    /// mirrors are in sync.
    pub(super) async fn start_epochs(
        self: &Arc<Self>,
        command: pb::DomainCommand,
    ) -> Result<pb::DomainStatus, Error> {
        let uuid = command.uuid;
        if uuid_invalid(&uuid) {
            return Err(invalid(format!("{uuid:?} is not a UUID")));
        }
        self.admit("start-epochs", &uuid, command.fence)?;
        self.replicas("start-epochs")?;
        if self.deps.marker.is_none() {
            return Err(Error::Standby {
                vm: uuid,
                reason: "this agent has no etcd: an ended epoch could not record the standby stale before the guest's output flows".into(),
            });
        }
        let status = self.deps.libvirt.status(&uuid).await?;
        if status.state != DomainState::Running {
            return Err(Error::Libvirt(crate::libvirt::Error::DomainNotRunning {
                uuid: uuid.clone(),
            }));
        }
        if self
            .ft
            .run(&uuid)
            .is_some_and(|r| !r.ended.load(Ordering::SeqCst))
        {
            return Ok(status_to_pb(status));
        }
        let gate = self.ensure_gate(&uuid)?;
        let run = Arc::new(Run::default());
        let (stop_tx, stop) = watch::channel(false);
        *run.stop.lock().unwrap_or_else(PoisonError::into_inner) = Some(stop_tx);
        run.waiting.store(true, Ordering::SeqCst);
        self.ft
            .runs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(uuid.clone(), run.clone());
        let inner = self.clone();
        tokio::spawn(async move {
            tracing::info!(vm = %uuid, node = %inner.node, "FT epochs begin: waiting for the mirrors");
            match inner.epochs(&uuid, gate, &run, stop).await {
                Ok(epoch) => {
                    tracing::info!(vm = %uuid, node = %inner.node, epoch, "FT epochs end: stopped");
                    run.fail("stopped".into());
                }
                Err(Error::Epoch(epoch::Error::QemuDied { epoch, .. })) => {
                    // No error to report: the standby's checkpoint is still good, and the pair
                    // resumes it when libvirt reports the domain crashed.
                    tracing::warn!(vm = %uuid, node = %inner.node, epoch, "FT epochs end: the guest's QEMU died; its standby holds epoch {epoch}");
                    run.ended.store(true, Ordering::SeqCst);
                }
                Err(e) => {
                    let reason = daemon::error_chain(&e).to_string();
                    tracing::warn!(vm = %uuid, node = %inner.node, error = %reason, "FT epochs end: failed, the guest runs unprotected");
                    run.fail(reason);
                    // The peer's copy is stale now (marked so): a new mirror path, resynced
                    // and verified, is what protects the VM again.
                    if let Err(e) = mirror::stop(&inner.deps.libvirt, &inner.node, &uuid).await {
                        tracing::warn!(vm = %uuid, node = %inner.node, error = %daemon::error_chain(&e), "stopping the mirror after the FT epochs ended failed");
                    }
                }
            }
        });
        Ok(status_to_pb(status))
    }

    async fn epochs(
        &self,
        uuid: &str,
        gate: Arc<OutputGate>,
        run: &Run,
        stop: watch::Receiver<bool>,
    ) -> Result<u64, Error> {
        self.wait_mirrors(uuid).await?;
        run.waiting.store(false, Ordering::SeqCst);
        let replicas = self.replicas("start-epochs")?;
        let (pid, ram) = self.qemu_ram(uuid).await?;
        let socket = replicas.peer_ft_socket(uuid).await?;
        let ft = self.ft_domain(uuid, false);
        let mut primary =
            Primary::connect(uuid, &ft.qmp_socket, pid, &ram, &socket, &self.ft_dir()).await?;
        if let Some(marker) = self.deps.marker.clone() {
            // The mark must name the mirror path current when the epochs end (a renewed path
            // makes an older mark void), so the hold is taken then.
            let (vm, libvirt, node) = (
                uuid.to_string(),
                self.deps.libvirt.clone(),
                self.node.clone(),
            );
            primary = primary.invalidate_with(Arc::new(move || {
                let (marker, vm, libvirt, node) =
                    (marker.clone(), vm.clone(), libvirt.clone(), node.clone());
                Box::pin(async move {
                    if marker.mark_peer_behind(&vm).await == Some(false) {
                        superseded_run(&libvirt, &vm, &node).await;
                    }
                })
            }));
        }
        let primary = primary.hold_output(gate).await;
        let (reports_tx, mut reports) = mpsc::unbounded_channel();
        let looping = epoch::run(primary, Settings::default(), stop, reports_tx);
        tokio::pin!(looping);
        let mut last_commit: Option<Instant> = None;
        loop {
            tokio::select! {
                ended = &mut looping => return Ok(ended?),
                Some(report) = reports.recv() => {
                    if report.epoch == 1 {
                        tracing::info!(vm = uuid, node = %self.node, pause_ms = report.pause.as_secs_f64() * 1e3, "FT: first checkpoint committed, the VM is protected");
                    }
                    // The histograms first: a report that shows this epoch counts it.
                    run.pauses.record(report.pause);
                    let now = Instant::now();
                    if let Some(last) = last_commit.replace(now) {
                        run.epochs.record(now - last);
                    }
                    let us = u64::try_from(report.pause.as_micros()).unwrap_or(u64::MAX);
                    run.last_pause_us.store(us, Ordering::SeqCst);
                    run.committed_at_ms.store(unix_ms(), Ordering::SeqCst);
                    run.committed.store(report.epoch, Ordering::SeqCst);
                }
            }
        }
    }

    /// Waits until every disk of `uuid` is mirrored in sync (the standby's disk equals the
    /// primary's at the first checkpoint); fails when a mirror fails or none runs.
    async fn wait_mirrors(&self, uuid: &str) -> Result<(), Error> {
        loop {
            let mirrors = mirror::status(&self.deps.libvirt, &self.node, uuid).await?;
            if mirrors.is_empty() {
                return Err(Error::Standby {
                    vm: uuid.to_string(),
                    reason: "no disk mirror runs: the epochs need the peer's copy in sync".into(),
                });
            }
            if let Some(failed) = mirrors
                .iter()
                .find(|m| matches!(m.state, MirrorState::Failed { .. }))
            {
                return Err(Error::Standby {
                    vm: uuid.to_string(),
                    reason: format!("the mirror of {} failed", failed.device),
                });
            }
            if mirrors.iter().all(|m| m.state == MirrorState::Ready) {
                return Ok(());
            }
            tokio::time::sleep(MIRROR_POLL).await;
        }
    }

    /// Whether `domain` is paused only for a checkpoint: its epoch loop runs here and
    /// committed an epoch within the commit timeout (and a bit), and nothing else (a failed
    /// disk) paused it. A loop stuck in a pause shows as paused.
    pub(super) fn checkpoint_pause(&self, domain: &DomainStatus) -> bool {
        let checkpointing = |run: Arc<Run>| {
            let committed_at = run.committed_at_ms.load(Ordering::SeqCst);
            !run.ended.load(Ordering::SeqCst)
                && committed_at > 0
                && unix_ms().saturating_sub(committed_at) < CHECKPOINT_PAUSE_MS
        };
        domain.state == DomainState::Paused
            && domain.reason != "ioerror"
            && self.ft.run(&domain.uuid).is_some_and(checkpointing)
    }

    /// This host's FT side of domain `uuid`, for listings.
    pub(super) async fn ft_status(&self, uuid: &str) -> Option<pb::FtStatus> {
        if let Some(run) = self.ft.run(uuid) {
            return Some(pb::FtStatus {
                role: pb::FtRole::Primary.into(),
                committed_epoch: run.committed.load(Ordering::SeqCst),
                last_pause_us: run.last_pause_us.load(Ordering::SeqCst),
                error: run
                    .error
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .clone(),
                waiting_for_mirror: run.waiting.load(Ordering::SeqCst),
                pauses: Some(run.pauses.report()),
                epochs: Some(run.epochs.report()),
            });
        }
        let committed = self
            .deps
            .replicas
            .as_ref()?
            .standbys()
            .committed(uuid)
            .await?;
        Some(pb::FtStatus {
            role: pb::FtRole::Standby.into(),
            committed_epoch: committed,
            ..pb::FtStatus::default()
        })
    }

    /// Resumes every FT primary that an agent before this one left paused mid-checkpoint (its
    /// epoch loop died with it). Safe before any new checkpoint: the guest's frames stay held
    /// in its filters and its serial output, with no gate yet, is dropped, so nothing it does
    /// now is seen before a new standby commits; a failover meanwhile resumes the old standby,
    /// which no observer saw past. The pair then re-protects the running VM.
    pub(crate) async fn resume_orphan_primaries(&self) {
        let domains = match self.deps.libvirt.list().await {
            Ok(domains) => domains,
            Err(e) => {
                tracing::warn!(node = %self.node, error = %daemon::error_chain(&e), "listing domains for FT primaries left paused failed");
                return;
            }
        };
        for domain in domains.iter().filter(|d| d.state == DomainState::Paused) {
            let socket = self.ft_domain(&domain.uuid, false).qmp_socket;
            if socket.exists() {
                self.resume_orphan_primary(&domain.uuid, &socket).await;
            }
        }
    }

    /// Resumes FT primary `uuid` if its QEMU (QMP socket `socket`) is stopped in a checkpoint.
    async fn resume_orphan_primary(&self, uuid: &str, socket: &std::path::Path) {
        let mut qmp = match Qmp::connect_within(socket, ORPHAN_PROBE_TIMEOUT).await {
            Ok(qmp) => qmp,
            Err(e) => {
                tracing::warn!(vm = uuid, node = %self.node, error = %daemon::error_chain(&e), "probing a paused FT domain failed");
                return;
            }
        };
        let status = qmp.status().await.unwrap_or_default();
        // A standby waits in `inmigrate`; an I/O error pause (`io-error`) is not ours to undo.
        if !CHECKPOINT_STATES.contains(&status.as_str()) {
            return;
        }
        if !self.still_owned_here(uuid).await {
            tracing::warn!(vm = uuid, node = %self.node, status, "FT orphan resume skipped: the pair moved the VM since (or etcd cannot tell); the guest stays stopped, its output held, until a standby replaces it");
            return;
        }
        tracing::warn!(vm = uuid, node = %self.node, status, "FT orphan resume begin: the guest was left stopped mid-checkpoint by an agent that died");
        match qmp.resume(ORPHAN_RESUME_TIMEOUT).await {
            Ok(()) => {
                tracing::info!(vm = uuid, node = %self.node, "FT orphan resume end: ok, the guest runs unprotected until the pair protects it again")
            }
            Err(e) => {
                tracing::error!(vm = uuid, node = %self.node, error = %daemon::error_chain(&e), "FT orphan resume end: failed, the guest stays paused")
            }
        }
    }

    /// Whether the run of `uuid` here is still the VM's current one: the generation its
    /// domain was defined under is the owner generation in etcd. A stopped guest lets nothing
    /// out (its network filters' timer runs on guest time), so a run the pair may have moved
    /// elsewhere stays stopped. A domain defined before generations were recorded counts as
    /// current, as it did then.
    async fn still_owned_here(&self, uuid: &str) -> bool {
        let run = match self.deps.libvirt.generation(uuid).await {
            Ok(Some(run)) => run,
            Ok(None) => return true,
            Err(_) => return false,
        };
        let owner = match &self.deps.marker {
            Some(marker) => marker.owner_generation(uuid).await.ok().flatten(),
            None => None,
        };
        owner == Some(run)
    }

    /// Forgets `uuid`'s FT state: its epochs end and its gate closes (the domain is gone).
    pub(super) async fn forget_ft(&self, uuid: &str) {
        self.ft.stop(uuid);
        self.ft
            .gates
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(uuid);
        if let Some(replicas) = &self.deps.replicas {
            replicas.standbys().remove(uuid).await;
        }
    }

    /// The serial gate of `uuid`, when it is an FT domain of this host.
    pub(super) fn gate_of(&self, uuid: &str) -> Option<Arc<OutputGate>> {
        self.ft.gate(uuid)
    }
}

/// Ends a run whose stale mark etcd refused: the pair moved the VM (or this host lost its
/// lease), so its output must never flow, and QEMU's own timer would let its held frames out
/// in the end. Its QEMU is destroyed; the epoch loop then drops the held output. If that
/// fails the output stays held for good.
async fn superseded_run(libvirt: &crate::libvirt::Libvirt, vm: &str, node: &str) {
    tracing::error!(
        vm,
        node,
        op = "ft-superseded",
        "FT superseded run begin: the standby could not be marked stale, so this run's output must never flow; destroying its QEMU"
    );
    match libvirt.destroy(vm).await {
        Ok(status) => {
            tracing::error!(vm, node, op = "ft-superseded", state = ?status.state, "FT superseded run end: destroyed; its held output is dropped")
        }
        Err(e) => {
            tracing::error!(vm, node, op = "ft-superseded", error = %daemon::error_chain(&e), "FT superseded run end: destroy failed; its output stays held");
            std::future::pending::<()>().await;
        }
    }
}
