//! The agent's gRPC service: translates `pairvisor.agent.v1` requests into calls on libvirt,
//! the storage groups and the serial logs, and their errors into statuses. Every mutating
//! request passes the [`Fence`] first.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;

use daemon::lease::{LeaseStatus, LeaseView};
use proto::agent as pb;
use tokio::sync::watch;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::config::Config;
use crate::domain::{self, Boot, DiskFormat, DomainSpec, HostProfile};
use crate::facts::Collector;
use crate::fence::{Fence, Token};
use crate::heartbeat::Heartbeats;
use crate::libvirt::{self, DomainState, DomainStatus, Libvirt};
use crate::mirror;
use crate::replica::Replicas;
use crate::serial;
use crate::stale::Marker;
use crate::storage::StorageGroups;

mod error;
mod export;
mod ft;
mod import;
mod isos;
mod mirrors;
mod screens;
mod snapshots;

pub use error::Error;

/// The agent's gRPC service.
#[derive(Clone, Debug)]
pub struct AgentService {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    node: String,
    deps: Deps,
    host: HostProfile,
    image_dir: PathBuf,
    serial_dir: PathBuf,
    state_dir: PathBuf,
    networks: BTreeMap<String, String>,
    ft: ft::FtRuns,
    snapshots: snapshots::Locks,
}

/// The parts of the agent the service uses.
#[derive(Debug)]
pub struct Deps {
    /// The libvirt connection.
    pub libvirt: Libvirt,
    /// The storage groups.
    pub storage: StorageGroups,
    /// The host's facts.
    pub facts: Collector,
    /// The fence every mutating request passes.
    pub fence: Arc<Fence>,
    /// What this host hears of its peer.
    pub heartbeats: Heartbeats,
    /// The host lease's status (always `Expired` for an agent without etcd).
    pub lease: watch::Receiver<LeaseView>,
    /// The HA replica service, when the host has A-Links to its peer.
    pub replicas: Option<Arc<Replicas>>,
    /// Writes the stale marks that release a broken mirror's held writes (none without etcd:
    /// then a broken mirror is not held).
    pub marker: Option<Marker>,
}

impl AgentService {
    /// A service for the host described by `config`.
    pub fn new(config: &Config, deps: Deps) -> AgentService {
        AgentService {
            inner: Arc::new(Inner {
                node: config.node.clone(),
                deps,
                host: HostProfile {
                    domain_type: config.domain_type,
                    emulator: config.emulator.clone(),
                    ft_preload: config.ft_shim(),
                },
                image_dir: config.image_dir.clone(),
                serial_dir: config.serial_dir(),
                state_dir: config.state_dir.clone(),
                networks: config.networks.clone(),
                ft: ft::FtRuns::default(),
                snapshots: snapshots::Locks::default(),
            }),
        }
    }
}

impl AgentService {
    /// The work an agent that starts owes guests an earlier one left: FT primaries it left
    /// stopped mid-checkpoint are resumed (see `resume_orphan_primaries`).
    pub fn recover(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let inner = self.inner.clone();
        async move { inner.resume_orphan_primaries().await }
    }
}

impl Inner {
    /// Resolves a spec's names (storage groups, volumes, networks, image) to this host's paths.
    fn resolve(&self, spec: pb::VmSpec, generation: u64) -> Result<DomainSpec, Error> {
        let disks = spec
            .disks
            .iter()
            .map(|d| {
                Ok(domain::Disk {
                    path: self.deps.storage.volume_path(&d.storage_group, &d.volume)?,
                    format: disk_format(d.format())?,
                })
            })
            .collect::<Result<_, Error>>()?;
        let nics = spec
            .nics
            .iter()
            .map(|n| {
                let bridge =
                    self.networks
                        .get(&n.network)
                        .ok_or_else(|| Error::UnknownNetwork {
                            name: n.network.clone(),
                            known: self.networks.keys().cloned().collect::<Vec<_>>().join(", "),
                        })?;
                Ok(domain::Nic {
                    bridge: bridge.clone(),
                    mac: n.mac.clone(),
                })
            })
            .collect::<Result<_, Error>>()?;
        let boot = match spec.boot {
            Some(pb::vm_spec::Boot::KernelImage(name)) => {
                if !plain_name(&name) {
                    return Err(invalid(format!("{name:?} is not a boot image name")));
                }
                let dir = self.image_dir.join(&name);
                Boot::Kernel(
                    images::BootImage::open(&dir)
                        .map_err(|source| Error::BootImage { name, source })?,
                )
            }
            Some(pb::vm_spec::Boot::Iso(iso)) => Boot::Cdrom(self.iso_path(&iso)?),
            None => return Err(invalid("the spec has no boot source")),
        };
        if uuid_invalid(&spec.uuid) {
            return Err(invalid(format!("{:?} is not a UUID", spec.uuid)));
        }
        let ft = spec.ft.then(|| self.ft_domain(&spec.uuid, false));
        Ok(DomainSpec {
            serial_log: serial::log_path(&self.serial_dir, &spec.uuid),
            vnc: !spec.ft,
            uuid: spec.uuid,
            name: spec.name,
            vcpus: spec.vcpus,
            memory_mib: spec.memory_mib,
            disks,
            nics,
            boot,
            self_fence: spec.self_fence,
            generation,
            ft,
        })
    }

    /// Runs a domain operation between a begin and an end log line sharing vm/node/op fields.
    async fn logged<F>(&self, op: &'static str, uuid: &str, f: F) -> Result<DomainStatus, Error>
    where
        F: Future<Output = Result<DomainStatus, libvirt::Error>>,
    {
        tracing::info!(vm = %uuid, node = %self.node, op, "domain op begin");
        let result = f.await;
        match &result {
            Ok(s) => {
                tracing::info!(vm = %uuid, node = %self.node, op, state = ?s.state, reason = %s.reason, "domain op end: ok");
            }
            Err(e) => {
                tracing::warn!(vm = %uuid, node = %self.node, op, error = %daemon::error_chain(e), "domain op end: failed");
            }
        }
        Ok(result?)
    }
}

/// A change of a domain's power state.
#[derive(Clone, Copy, Debug)]
enum Power {
    Start,
    AcpiShutdown,
    Destroy,
}

impl Inner {
    /// Passes `fence` for `vm` through the agent's fence, logging a refusal.
    fn admit(&self, op: &'static str, vm: &str, fence: Option<pb::Fence>) -> Result<(), Error> {
        let token = fence.map_or(
            Token {
                term: 0,
                generation: 0,
            },
            |f| Token {
                term: f.term,
                generation: f.generation,
            },
        );
        self.deps.fence.admit(token, vm).map_err(|e| {
            tracing::warn!(vm, node = %self.node, op, term = token.term, generation = token.generation, error = %e, "request refused by the fence");
            Error::from(e)
        })
    }

    /// Starts, shuts down or destroys the domain a request names, logging begin and end.
    async fn power(
        &self,
        power: Power,
        request: Request<pb::DomainCommand>,
    ) -> Result<Response<pb::DomainStatus>, Status> {
        let command = request.into_inner();
        let uuid = command.uuid;
        if uuid_invalid(&uuid) {
            return Err(invalid(format!("{uuid:?} is not a UUID")).into());
        }
        let op = match power {
            Power::Start => "start",
            Power::AcpiShutdown => "acpi-shutdown",
            Power::Destroy => "destroy",
        };
        self.admit(op, &uuid, command.fence)?;
        if let Power::Start = power {
            self.drop_replica(&uuid).await;
            if let Some(status) = self
                .start_from_standby(&uuid, command.resume_standby, generation_of(command.fence))
                .await?
            {
                return Ok(Response::new(status_to_pb(status)));
            }
            // A new QEMU of an FT domain: its output flows until epochs hold it again.
            self.ft.stop(&uuid);
            if let Some(gate) = self.gate_of(&uuid) {
                gate.open().await.map_err(Error::from)?;
            }
        }
        if let Power::Destroy = power {
            self.ft.stop(&uuid);
        }
        let libvirt = &self.deps.libvirt;
        let status = match power {
            Power::Start if command.track_writes => {
                self.logged("start", &uuid, self.start_tracking(&uuid))
                    .await
            }
            Power::Start => self.logged("start", &uuid, libvirt.start(&uuid)).await,
            Power::AcpiShutdown => {
                self.logged("acpi-shutdown", &uuid, libvirt.shutdown(&uuid))
                    .await
            }
            Power::Destroy => self.logged("destroy", &uuid, libvirt.destroy(&uuid)).await,
        }?;
        Ok(Response::new(status_to_pb(status)))
    }
}

impl Inner {
    /// Starts the domain paused, tracks its disks' writes from its first instruction, and
    /// resumes it (see [`mirror::track_from_start`]). The guest runs even when the tracking
    /// failed; the first mirror is then a full copy.
    async fn start_tracking(&self, uuid: &str) -> Result<DomainStatus, libvirt::Error> {
        let libvirt = &self.deps.libvirt;
        let started = libvirt.start_paused(uuid).await?;
        if started.state != DomainState::Paused {
            return Ok(started);
        }
        if let Err(e) = mirror::track_from_start(libvirt, &self.node, uuid).await {
            tracing::warn!(vm = uuid, node = %self.node, error = %daemon::error_chain(&e), "tracking writes from the start failed; the first mirror copies everything");
            libvirt.resume(uuid).await?;
        }
        libvirt.status(uuid).await
    }

    /// The replica service, or the error telling the caller of `op` this host has none.
    fn replicas(&self, op: &'static str) -> Result<&Replicas, Error> {
        self.deps
            .replicas
            .as_deref()
            .ok_or(Error::NoReplicaService { op })
    }

    /// Checks a replica request's volumes: some, raw, in known groups, with plain names.
    fn check_replica_volumes(&self, volumes: &[pb::VolumeRef]) -> Result<(), Error> {
        if volumes.is_empty() {
            return Err(invalid("the request names no volumes"));
        }
        for v in volumes {
            if disk_format(v.format())? != DiskFormat::Raw {
                return Err(invalid(format!(
                    "replica volume {} must be raw: the replica server serves files byte for byte",
                    v.volume
                )));
            }
            self.deps.storage.volume_path(&v.storage_group, &v.volume)?;
        }
        Ok(())
    }

    /// Creates the replica volumes that are missing; answers each one's export name and file.
    async fn create_replica_volumes(
        &self,
        volumes: &[pb::VolumeRef],
    ) -> Result<Vec<(String, PathBuf)>, Error> {
        let mut created = Vec::with_capacity(volumes.len());
        for v in volumes {
            let format = disk_format(v.format())?;
            let storage = &self.deps.storage;
            let volume = storage
                .create(&v.storage_group, &v.volume, v.size_bytes, format)
                .await?;
            created.push((volume.name, volume.path));
        }
        Ok(created)
    }

    /// Stops serving `vm`'s replica before the domain starts here: this host becomes its
    /// writer, and the peer's mirror must not write into this copy any more.
    async fn drop_replica(&self, vm: &str) {
        let Some(replicas) = &self.deps.replicas else {
            return;
        };
        if !replicas.exported(vm) {
            return;
        }
        let dropped = replicas.unexport(vm).await;
        tracing::info!(vm, node = %self.node, exports = ?dropped, "replica exports dropped: the domain starts on this host, which becomes its writer");
    }
}

/// The ownership generation a request's fence carries (0 without one).
fn generation_of(fence: Option<pb::Fence>) -> u64 {
    fence.map_or(0, |f| f.generation)
}

fn invalid(reason: impl Into<String>) -> Error {
    Error::InvalidRequest {
        reason: reason.into(),
    }
}

/// A name usable as one path component: letters, digits, '.', '_', '-', not starting with '.'.
fn plain_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

fn uuid_invalid(uuid: &str) -> bool {
    uuid.len() != 36
        || !uuid.chars().enumerate().all(|(i, c)| {
            matches!(i, 8 | 13 | 18 | 23) == (c == '-') && (c == '-' || c.is_ascii_hexdigit())
        })
}

fn disk_format(format: pb::VolumeFormat) -> Result<DiskFormat, Error> {
    match format {
        pb::VolumeFormat::Raw => Ok(DiskFormat::Raw),
        pb::VolumeFormat::Qcow2 => Ok(DiskFormat::Qcow2),
        pb::VolumeFormat::Invalid => Err(invalid("volume format is missing")),
    }
}

fn volume_format(format: DiskFormat) -> pb::VolumeFormat {
    match format {
        DiskFormat::Raw => pb::VolumeFormat::Raw,
        DiskFormat::Qcow2 => pb::VolumeFormat::Qcow2,
    }
}

fn status_to_pb(s: DomainStatus) -> pb::DomainStatus {
    let state = match s.state {
        DomainState::Undefined => pb::DomainState::Undefined,
        DomainState::Shutoff => pb::DomainState::Shutoff,
        DomainState::Running => pb::DomainState::Running,
        DomainState::Paused => pb::DomainState::Paused,
        DomainState::ShuttingDown => pb::DomainState::ShuttingDown,
        DomainState::Crashed => pb::DomainState::Crashed,
        DomainState::Other => pb::DomainState::Other,
    };
    pb::DomainStatus {
        uuid: s.uuid,
        name: s.name,
        state: state.into(),
        reason: s.reason,
        mirrors: Vec::new(),
        self_fence: s.self_fence,
        mirror_path: 0,
        mirrors_unknown: false,
        ft: None,
        disk_writes: Vec::new(),
    }
}

pub(crate) type SerialStream = Pin<Box<dyn Stream<Item = Result<pb::SerialChunk, Status>> + Send>>;

#[tonic::async_trait]
impl pb::agent_server::Agent for AgentService {
    async fn get_host_facts(
        &self,
        _request: Request<pb::GetHostFactsRequest>,
    ) -> Result<Response<pb::HostFacts>, Status> {
        let inner = &self.inner;
        let facts = inner.deps.facts.snapshot().map_err(Error::from)?;
        let storage_groups = facts
            .storage_groups
            .into_iter()
            .map(|g| pb::StorageGroupFacts {
                name: g.name,
                path: g.path.to_string_lossy().into_owned(),
                total_bytes: g.total_bytes,
                free_bytes: g.free_bytes,
            })
            .collect();
        let networks = facts
            .networks
            .into_iter()
            .map(|(name, bridge)| pb::NetworkFacts { name, bridge })
            .collect();
        Ok(Response::new(pb::HostFacts {
            node: inner.node.clone(),
            cpus: facts.cpus,
            memory_mib: facts.memory_mib,
            storage_groups,
            networks,
            boot_images: facts.boot_images,
            qemu_version: facts.versions.qemu,
            libvirt_version: facts.versions.libvirt,
            domain_type: inner.host.domain_type.as_str().to_string(),
            libvirt_uri: inner.deps.libvirt.uri().to_string(),
        }))
    }

    async fn list_domains(
        &self,
        _request: Request<pb::ListDomainsRequest>,
    ) -> Result<Response<pb::ListDomainsResponse>, Status> {
        let domains = self.inner.list_domains().await?;
        Ok(Response::new(pb::ListDomainsResponse { domains }))
    }

    async fn define_domain(
        &self,
        request: Request<pb::DefineDomainRequest>,
    ) -> Result<Response<pb::DomainStatus>, Status> {
        let request = request.into_inner();
        let spec = request
            .spec
            .ok_or_else(|| invalid("the request has no spec"))?;
        let inner = &self.inner;
        let spec = inner.resolve(spec, generation_of(request.fence))?;
        inner.admit("define", &spec.uuid, request.fence)?;
        if spec.ft.is_some() {
            inner.ensure_gate(&spec.uuid)?;
        }
        let xml = domain::domain_xml(&spec, &inner.host);
        tracing::debug!(vm = %spec.uuid, %xml, "domain XML");
        let status = inner
            .logged(
                "define",
                &spec.uuid,
                inner.deps.libvirt.define(&spec.uuid, xml),
            )
            .await?;
        Ok(Response::new(status_to_pb(status)))
    }

    async fn start_domain(
        &self,
        request: Request<pb::DomainCommand>,
    ) -> Result<Response<pb::DomainStatus>, Status> {
        self.inner.power(Power::Start, request).await
    }

    async fn shutdown_domain(
        &self,
        request: Request<pb::DomainCommand>,
    ) -> Result<Response<pb::DomainStatus>, Status> {
        self.inner.power(Power::AcpiShutdown, request).await
    }

    async fn destroy_domain(
        &self,
        request: Request<pb::DomainCommand>,
    ) -> Result<Response<pb::DomainStatus>, Status> {
        self.inner.power(Power::Destroy, request).await
    }

    async fn undefine_domain(
        &self,
        request: Request<pb::DomainCommand>,
    ) -> Result<Response<pb::UndefineDomainResponse>, Status> {
        let command = request.into_inner();
        let uuid = command.uuid;
        if uuid_invalid(&uuid) {
            return Err(invalid(format!("{uuid:?} is not a UUID")).into());
        }
        self.inner.admit("undefine", &uuid, command.fence)?;
        self.inner
            .deps
            .libvirt
            .undefine(&uuid)
            .await
            .map_err(Error::from)?;
        if let Some(replicas) = &self.inner.deps.replicas {
            replicas.close_peer_socket(&uuid).await;
            replicas.close_peer_ft_socket(&uuid).await;
        }
        self.inner.forget_ft(&uuid).await;
        // The console history goes with the domain; a missing log is fine.
        let _ = std::fs::remove_file(serial::log_path(&self.inner.serial_dir, &uuid));
        tracing::info!(vm = %uuid, node = %self.inner.node, "domain undefined");
        Ok(Response::new(pb::UndefineDomainResponse {}))
    }

    async fn create_volume(
        &self,
        request: Request<pb::CreateVolumeRequest>,
    ) -> Result<Response<pb::Volume>, Status> {
        let req = request.into_inner();
        let format = disk_format(req.format())?;
        if uuid_invalid(&req.vm_uuid) {
            return Err(invalid(format!("vm_uuid {:?} is not a UUID", req.vm_uuid)).into());
        }
        self.inner.admit("create-volume", &req.vm_uuid, req.fence)?;
        let volume = self
            .inner
            .deps
            .storage
            .create(&req.storage_group, &req.name, req.size_bytes, format)
            .await
            .map_err(Error::from)?;
        tracing::info!(node = %self.inner.node, path = %volume.path.display(), size = volume.size_bytes, "volume ready");
        Ok(Response::new(pb::Volume {
            storage_group: volume.group,
            name: volume.name,
            path: volume.path.to_string_lossy().into_owned(),
            size_bytes: volume.size_bytes,
            format: volume_format(volume.format).into(),
        }))
    }

    async fn delete_volume(
        &self,
        request: Request<pb::DeleteVolumeRequest>,
    ) -> Result<Response<pb::DeleteVolumeResponse>, Status> {
        let req = request.into_inner();
        if uuid_invalid(&req.vm_uuid) {
            return Err(invalid(format!("vm_uuid {:?} is not a UUID", req.vm_uuid)).into());
        }
        self.inner.admit("delete-volume", &req.vm_uuid, req.fence)?;
        self.inner
            .deps
            .storage
            .delete(&req.storage_group, &req.name)
            .map_err(Error::from)?;
        tracing::info!(node = %self.inner.node, group = %req.storage_group, volume = %req.name, "volume deleted");
        Ok(Response::new(pb::DeleteVolumeResponse {}))
    }

    async fn put_iso(
        &self,
        request: Request<tonic::Streaming<pb::PutIsoRequest>>,
    ) -> Result<Response<pb::IsoFile>, Status> {
        Ok(Response::new(
            self.inner.put_iso(request.into_inner()).await?,
        ))
    }

    async fn import_volume(
        &self,
        request: Request<tonic::Streaming<pb::ImportVolumeRequest>>,
    ) -> Result<Response<pb::ImportedVolume>, Status> {
        Ok(Response::new(
            self.inner.import_volume(request.into_inner()).await?,
        ))
    }

    async fn delete_iso(
        &self,
        request: Request<pb::DeleteIsoRequest>,
    ) -> Result<Response<pb::DeleteIsoResponse>, Status> {
        self.inner.delete_iso(request.into_inner())?;
        Ok(Response::new(pb::DeleteIsoResponse {}))
    }

    async fn take_snapshot(
        &self,
        request: Request<pb::TakeSnapshotRequest>,
    ) -> Result<Response<pb::SnapshotTaken>, Status> {
        let inner = Arc::clone(&self.inner);
        let req = request.into_inner();
        let taken = snapshots::detached(async move { inner.take_snapshot(req).await }).await?;
        Ok(Response::new(taken))
    }

    async fn delete_snapshot(
        &self,
        request: Request<pb::SnapshotCommand>,
    ) -> Result<Response<pb::SnapshotDone>, Status> {
        let inner = Arc::clone(&self.inner);
        let req = request.into_inner();
        snapshots::detached(async move { inner.delete_snapshot(req).await }).await?;
        Ok(Response::new(pb::SnapshotDone {}))
    }

    async fn restore_snapshot(
        &self,
        request: Request<pb::SnapshotCommand>,
    ) -> Result<Response<pb::SnapshotDone>, Status> {
        let inner = Arc::clone(&self.inner);
        let req = request.into_inner();
        snapshots::detached(async move { inner.restore_snapshot(req).await }).await?;
        Ok(Response::new(pb::SnapshotDone {}))
    }

    type ExportVolumeStream = export::ExportStream;

    async fn export_volume(
        &self,
        request: Request<pb::ExportVolumeRequest>,
    ) -> Result<Response<export::ExportStream>, Status> {
        Ok(Response::new(
            self.inner.export_volume(request.into_inner()).await?,
        ))
    }

    async fn get_peer_health(
        &self,
        _request: Request<pb::GetPeerHealthRequest>,
    ) -> Result<Response<pb::PeerHealth>, Status> {
        let deps = &self.inner.deps;
        Ok(Response::new(pb::PeerHealth {
            node: self.inner.node.clone(),
            paths: deps
                .heartbeats
                .report()
                .into_iter()
                .map(path_to_pb)
                .collect(),
            term: deps.fence.term(),
            lease_alive: deps.lease.borrow().status() == LeaseStatus::Alive,
            alinks: deps
                .replicas
                .as_deref()
                .map(Replicas::link_stats)
                .unwrap_or_default()
                .iter()
                .map(alink_to_pb)
                .collect(),
        }))
    }

    async fn export_replica(
        &self,
        request: Request<pb::ExportReplicaRequest>,
    ) -> Result<Response<pb::ExportReplicaResponse>, Status> {
        let req = request.into_inner();
        let inner = &self.inner;
        let replicas = inner.replicas("export-replica")?;
        if uuid_invalid(&req.vm_uuid) {
            return Err(invalid(format!("vm_uuid {:?} is not a UUID", req.vm_uuid)).into());
        }
        inner.check_replica_volumes(&req.volumes)?;
        inner.admit("export-replica", &req.vm_uuid, req.fence)?;
        let volumes = inner.create_replica_volumes(&req.volumes).await?;
        let exports = replicas
            .export(&req.vm_uuid, &volumes)
            .await
            .map_err(Error::from)?;
        Ok(Response::new(pb::ExportReplicaResponse { exports }))
    }

    async fn unexport_replica(
        &self,
        request: Request<pb::DomainCommand>,
    ) -> Result<Response<pb::ExportReplicaResponse>, Status> {
        let command = request.into_inner();
        let inner = &self.inner;
        let replicas = inner.replicas("unexport-replica")?;
        if uuid_invalid(&command.uuid) {
            return Err(invalid(format!("{:?} is not a UUID", command.uuid)).into());
        }
        inner.admit("unexport-replica", &command.uuid, command.fence)?;
        replicas.unexport(&command.uuid).await;
        // An FT standby over those replicas can no longer follow the primary.
        if replicas.standbys().committed(&command.uuid).await.is_some() {
            replicas.standbys().remove(&command.uuid).await;
            inner
                .deps
                .libvirt
                .destroy(&command.uuid)
                .await
                .map_err(Error::from)?;
            tracing::info!(vm = %command.uuid, node = %inner.node, "FT standby stopped: its replicas are no longer served");
        }
        Ok(Response::new(pb::ExportReplicaResponse {
            exports: Vec::new(),
        }))
    }

    async fn start_mirror(
        &self,
        request: Request<pb::StartMirrorRequest>,
    ) -> Result<Response<pb::DomainStatus>, Status> {
        Ok(Response::new(
            self.inner.start_mirror(request.into_inner()).await?,
        ))
    }

    async fn stop_mirror(
        &self,
        request: Request<pb::DomainCommand>,
    ) -> Result<Response<pb::DomainStatus>, Status> {
        Ok(Response::new(
            self.inner.stop_mirror(request.into_inner()).await?,
        ))
    }

    async fn prepare_standby(
        &self,
        request: Request<pb::DefineDomainRequest>,
    ) -> Result<Response<pb::DomainStatus>, Status> {
        Ok(Response::new(
            self.inner.prepare_standby(request.into_inner()).await?,
        ))
    }

    async fn start_epochs(
        &self,
        request: Request<pb::DomainCommand>,
    ) -> Result<Response<pb::DomainStatus>, Status> {
        Ok(Response::new(
            self.inner.start_epochs(request.into_inner()).await?,
        ))
    }

    async fn screenshot(
        &self,
        request: Request<pb::ScreenshotRequest>,
    ) -> Result<Response<pb::ScreenshotReply>, Status> {
        let png = self.inner.screenshot(request.into_inner().uuid).await?;
        Ok(Response::new(pb::ScreenshotReply { png }))
    }

    type VncStream = crate::vnc::Replies;

    async fn vnc(
        &self,
        request: Request<tonic::Streaming<pb::VncData>>,
    ) -> Result<Response<crate::vnc::Replies>, Status> {
        Ok(Response::new(self.inner.vnc(request.into_inner()).await?))
    }

    type StreamSerialStream = SerialStream;

    async fn stream_serial(
        &self,
        request: Request<pb::StreamSerialRequest>,
    ) -> Result<Response<SerialStream>, Status> {
        Ok(Response::new(
            self.inner.stream_serial(&request.into_inner())?,
        ))
    }
}

fn alink_to_pb(link: &replicator::LinkStats) -> pb::AlinkStats {
    pb::AlinkStats {
        index: u32::try_from(link.index).unwrap_or(u32::MAX),
        up: link.state == replicator::LinkState::Up,
        bytes_sent: link.bytes_sent,
        bytes_received: link.bytes_received,
        retransmits: link.retransmits,
        rtt_us: link.rtt_us,
    }
}

fn path_to_pb(report: crate::heartbeat::PathReport) -> pb::PathHealth {
    pb::PathHealth {
        name: report.name,
        heard: report.since_heard.is_some(),
        ms_since_heard: report
            .since_heard
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        peer: report.peer,
        send_error: report.send_error,
    }
}

#[cfg(test)]
mod tests;
