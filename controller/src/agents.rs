//! Clients of the nodes' agents, one lazily connected channel per agent address. Every
//! mutating call carries a [`Token`]: the serving term and the VM's ownership generation,
//! which the agent checks against the highest it has seen.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proto::agent as pb;
use proto::agent::agent_client::AgentClient;
use tonic::transport::{Channel, ClientTlsConfig};

use crate::model::{Boot, DiskFormat, Mode, VmRecord};

/// How long to wait for an agent to accept a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// HTTP/2 keep-alive interval and timeout: a connection to a host that lost power is noticed
/// in seconds, not when TCP gives up.
const KEEP_ALIVE: Duration = Duration::from_secs(5);
/// Longest agent call: the first define on a fresh embed root runs QEMU's capability probe.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Timeout of the periodic state polls, short so a dead node is noticed quickly.
pub const POLL_TIMEOUT: Duration = Duration::from_secs(2);
/// Timeout of an ACPI power-button press: quick unless the guest's monitor hangs, and a
/// power-off queued behind it must not wait long.
pub const ACPI_TIMEOUT: Duration = Duration::from_secs(5);
/// Timeout of the health polls (several a second). A poll waits this long for an agent that
/// died, which delays every decision on a host that went silent (an FT takeover among them);
/// a live agent answers from memory within milliseconds.
pub const HEALTH_TIMEOUT: Duration = Duration::from_millis(150);
/// A snapshot's copy, deletion or restore: bounded by the disks' size, not by a round trip.
pub const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(2 * 3600);

pub use daemon::fence::Token;

/// A token as the agent API carries it.
pub fn fence(token: Token) -> Option<pb::Fence> {
    Some(pb::Fence {
        term: token.term,
        generation: token.generation,
    })
}

/// Errors reaching an agent.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The agent refused or failed the call.
    #[error("agent on {node}: {op}: {message}")]
    Call {
        /// Node.
        node: String,
        /// The call.
        op: &'static str,
        /// The agent's gRPC code.
        code: tonic::Code,
        /// The agent's message.
        message: String,
    },
    /// The agent refused the command's term or generation: another controller serves now,
    /// or the VM was reassigned.
    #[error("agent on {node} refused {op}: {message}")]
    Fenced {
        /// Node.
        node: String,
        /// The call.
        op: &'static str,
        /// The agent's message.
        message: String,
    },
    /// The task running a streaming call failed (panicked or was cancelled).
    #[error("the call to the agent on {node} failed: {reason}")]
    Task {
        /// Node.
        node: String,
        /// The join error.
        reason: String,
    },
    /// The agent's address is not a valid endpoint.
    #[error("agent address {address} of node {node} is invalid")]
    Endpoint {
        /// Node.
        node: String,
        /// The address.
        address: String,
        /// The cause.
        #[source]
        source: tonic::transport::Error,
    },
}

/// Agent clients by address; cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct AgentPool {
    channels: Arc<Mutex<HashMap<String, Channel>>>,
    /// This controller's client TLS (its certificate, the CA the agents' chain to); `None`
    /// calls the agents in plain HTTP/2 (tests only).
    tls: Option<ClientTlsConfig>,
}

/// One node's agent.
#[derive(Clone, Debug)]
pub struct Agent {
    node: String,
    client: AgentClient<Channel>,
}

impl AgentPool {
    /// A pool that calls the agents over TLS with `tls`.
    pub fn with_tls(tls: ClientTlsConfig) -> AgentPool {
        AgentPool {
            channels: Arc::default(),
            tls: Some(tls),
        }
    }

    /// The agent of `node` at `address`.
    pub fn get(&self, node: &str, address: &str) -> Result<Agent, Error> {
        let mut channels = self
            .channels
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let channel = match channels.get(address) {
            Some(channel) => channel.clone(),
            None => {
                let endpoint = proto::transport::endpoint_at(address, self.tls.as_ref()).map_err(
                    |source| Error::Endpoint {
                        node: node.to_string(),
                        address: address.to_string(),
                        source,
                    },
                )?;
                let channel = endpoint
                    .connect_timeout(CONNECT_TIMEOUT)
                    .http2_keep_alive_interval(KEEP_ALIVE)
                    .keep_alive_timeout(KEEP_ALIVE)
                    .keep_alive_while_idle(true)
                    .connect_lazy();
                channels.insert(address.to_string(), channel.clone());
                channel
            }
        };
        Ok(Agent {
            node: node.to_string(),
            client: AgentClient::new(channel),
        })
    }
}

fn request<T>(message: T, timeout: Duration) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(timeout);
    request
}

type Client = AgentClient<Channel>;

impl Agent {
    /// The stream a streaming call `call` opens, or why it did not open within
    /// [`CALL_TIMEOUT`] (the stream itself may then run for as long as it needs).
    async fn opened<T>(
        &self,
        op: &'static str,
        call: impl Future<Output = Result<tonic::Response<tonic::Streaming<T>>, tonic::Status>>,
    ) -> Result<tonic::Streaming<T>, Error> {
        match tokio::time::timeout(CALL_TIMEOUT, call).await {
            Ok(result) => Ok(result.map_err(self.failed(op))?.into_inner()),
            Err(_) => Err(self.failed(op)(tonic::Status::deadline_exceeded(format!(
                "no answer within {CALL_TIMEOUT:?}"
            )))),
        }
    }

    fn failed(&self, op: &'static str) -> impl FnOnce(tonic::Status) -> Error {
        let node = self.node.clone();
        move |status| match status.code() {
            tonic::Code::Aborted => Error::Fenced {
                node,
                op,
                message: status.message().to_string(),
            },
            code => Error::Call {
                node,
                op,
                code,
                message: status.message().to_string(),
            },
        }
    }

    /// One call of `method` with `message`, bounded by `timeout` here as well as at the agent:
    /// the deadline header alone does not end a call to a host that vanished (no reset, no
    /// answer), and a health poll stuck on one would go stale.
    async fn call<M, R, F, Fut>(
        &self,
        op: &'static str,
        timeout: Duration,
        message: M,
        method: F,
    ) -> Result<R, Error>
    where
        F: FnOnce(Client, tonic::Request<M>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<R>, tonic::Status>>,
    {
        let call = method(self.client.clone(), request(message, timeout));
        match tokio::time::timeout(timeout, call).await {
            Ok(result) => result
                .map(tonic::Response::into_inner)
                .map_err(self.failed(op)),
            Err(_) => Err(self.failed(op)(tonic::Status::deadline_exceeded(format!(
                "no answer within {timeout:?}"
            )))),
        }
    }

    /// What this host hears of its peer, its highest term and its lease.
    pub async fn peer_health(&self) -> Result<pb::PeerHealth, Error> {
        let message = pb::GetPeerHealthRequest {};
        self.call(
            "reading peer health",
            HEALTH_TIMEOUT,
            message,
            |mut c, r| async move { c.get_peer_health(r).await },
        )
        .await
    }

    /// Every domain of the host.
    pub async fn list_domains(&self) -> Result<Vec<pb::DomainStatus>, Error> {
        let message = pb::ListDomainsRequest {};
        let listed = self
            .call(
                "listing domains",
                POLL_TIMEOUT,
                message,
                |mut c, r| async move { c.list_domains(r).await },
            )
            .await?;
        Ok(listed.domains)
    }

    /// Creates every volume of `vm` (idempotent).
    pub async fn create_volumes(&self, vm: &VmRecord, token: Token) -> Result<(), Error> {
        for disk in &vm.disks {
            let message = pb::CreateVolumeRequest {
                storage_group: disk.storage_group.clone(),
                name: disk.volume.clone(),
                size_bytes: disk.size_bytes,
                format: volume_format(disk.format).into(),
                vm_uuid: vm.uuid.clone(),
                fence: fence(token),
            };
            self.call(
                "creating volume",
                CALL_TIMEOUT,
                message,
                |mut c, r| async move { c.create_volume(r).await },
            )
            .await?;
        }
        Ok(())
    }

    /// Uploads the ISO whose header and bytes `parts` yields (header first); the agent
    /// answers once its copy is synced in place, with the copy's SHA-256.
    pub async fn put_iso(
        &self,
        parts: impl tokio_stream::Stream<Item = pb::PutIsoRequest> + Send + 'static,
    ) -> Result<pb::IsoFile, Error> {
        self.client
            .clone()
            .put_iso(tonic::Request::new(parts))
            .await
            .map(tonic::Response::into_inner)
            .map_err(self.failed("uploading an ISO"))
    }

    /// Fills a new volume from the image whose header, bytes and commit `parts` yields; the
    /// agent answers once the volume is in place.
    pub async fn import_volume(
        &self,
        parts: impl tokio_stream::Stream<Item = pb::ImportVolumeRequest> + Send + 'static,
    ) -> Result<pb::ImportedVolume, Error> {
        self.client
            .clone()
            .import_volume(tonic::Request::new(parts))
            .await
            .map(tonic::Response::into_inner)
            .map_err(self.failed("importing a volume"))
    }

    /// Takes snapshot `id` of `vm`'s volumes on top of `parent`, copied to the peer if
    /// `replicate`.
    pub async fn take_snapshot(
        &self,
        vm: &VmRecord,
        id: &str,
        parent: Option<&str>,
        replicate: bool,
        token: Token,
    ) -> Result<pb::SnapshotTaken, Error> {
        let message = pb::TakeSnapshotRequest {
            vm_uuid: vm.uuid.clone(),
            id: id.to_string(),
            parent: parent.unwrap_or_default().to_string(),
            volumes: replica_volumes(vm),
            fence: fence(token),
            replicate,
        };
        self.call(
            "taking a snapshot",
            SNAPSHOT_TIMEOUT,
            message,
            |mut c, r| async move { c.take_snapshot(r).await },
        )
        .await
    }

    /// Deletes snapshot `id` of `vm`'s volumes (idempotent).
    pub async fn delete_snapshot(
        &self,
        vm: &VmRecord,
        id: &str,
        token: Token,
    ) -> Result<(), Error> {
        let message = snapshot_command(vm, id, token);
        self.call(
            "deleting a snapshot",
            SNAPSHOT_TIMEOUT,
            message,
            |mut c, r| async move { c.delete_snapshot(r).await },
        )
        .await
        .map(drop)
    }

    /// Writes snapshot `id` over the volumes of stopped VM `vm`.
    pub async fn restore_snapshot(
        &self,
        vm: &VmRecord,
        id: &str,
        token: Token,
    ) -> Result<(), Error> {
        let message = snapshot_command(vm, id, token);
        self.call(
            "restoring a snapshot",
            SNAPSHOT_TIMEOUT,
            message,
            |mut c, r| async move { c.restore_snapshot(r).await },
        )
        .await
        .map(drop)
    }

    /// Deletes an ISO from the host's library (idempotent).
    pub async fn delete_iso(&self, iso: pb::IsoRef, term: i64) -> Result<(), Error> {
        let message = pb::DeleteIsoRequest {
            iso: Some(iso),
            term,
        };
        self.call(
            "deleting an ISO",
            CALL_TIMEOUT,
            message,
            |mut c, r| async move { c.delete_iso(r).await },
        )
        .await
        .map(drop)
    }

    /// Deletes every volume of `vm` (idempotent).
    pub async fn delete_volumes(&self, vm: &VmRecord, token: Token) -> Result<(), Error> {
        for disk in &vm.disks {
            let message = pb::DeleteVolumeRequest {
                storage_group: disk.storage_group.clone(),
                name: disk.volume.clone(),
                vm_uuid: vm.uuid.clone(),
                fence: fence(token),
            };
            self.call(
                "deleting volume",
                CALL_TIMEOUT,
                message,
                |mut c, r| async move { c.delete_volume(r).await },
            )
            .await?;
        }
        Ok(())
    }

    /// Serves `vm`'s volumes to the peer's mirror, creating them here if missing (HA standby).
    pub async fn export_replica(&self, vm: &VmRecord, token: Token) -> Result<(), Error> {
        let message = pb::ExportReplicaRequest {
            vm_uuid: vm.uuid.clone(),
            volumes: replica_volumes(vm),
            fence: fence(token),
        };
        self.call(
            "exporting replica",
            CALL_TIMEOUT,
            message,
            |mut c, r| async move { c.export_replica(r).await },
        )
        .await
        .map(|_| ())
    }

    /// Stops serving `uuid`'s volumes to the peer (idempotent).
    pub async fn unexport_replica(&self, uuid: &str, token: Token) -> Result<(), Error> {
        let message = command(uuid, token);
        self.call(
            "unexporting replica",
            CALL_TIMEOUT,
            message,
            |mut c, r| async move { c.unexport_replica(r).await },
        )
        .await
        .map(|_| ())
    }

    /// Mirrors the running domain of `vm` to the replica on `peer` (idempotent).
    pub async fn start_mirror(
        &self,
        vm: &VmRecord,
        peer: &str,
        token: Token,
    ) -> Result<pb::DomainStatus, Error> {
        let message = pb::StartMirrorRequest {
            uuid: vm.uuid.clone(),
            volumes: replica_volumes(vm),
            fence: fence(token),
            peer: peer.to_string(),
        };
        self.call(
            "starting mirror",
            CALL_TIMEOUT,
            message,
            |mut c, r| async move { c.start_mirror(r).await },
        )
        .await
    }

    /// Starts a standby QEMU of FT VM `vm` on this (the peer's) host.
    pub async fn prepare_standby(
        &self,
        vm: &VmRecord,
        token: Token,
    ) -> Result<pb::DomainStatus, Error> {
        let message = pb::DefineDomainRequest {
            spec: Some(spec_of(vm)),
            fence: fence(token),
        };
        self.call(
            "preparing the FT standby",
            CALL_TIMEOUT,
            message,
            |mut c, r| async move { c.prepare_standby(r).await },
        )
        .await
    }

    /// Begins the epochs of FT VM `uuid`'s running domain (idempotent).
    pub async fn start_epochs(&self, uuid: &str, token: Token) -> Result<pb::DomainStatus, Error> {
        self.call(
            "starting the FT epochs",
            CALL_TIMEOUT,
            command(uuid, token),
            |mut c, r| async move { c.start_epochs(r).await },
        )
        .await
    }

    /// Defines the domain of `vm` (idempotent).
    pub async fn define(&self, vm: &VmRecord, token: Token) -> Result<pb::DomainStatus, Error> {
        let message = pb::DefineDomainRequest {
            spec: Some(spec_of(vm)),
            fence: fence(token),
        };
        self.call(
            "defining domain",
            CALL_TIMEOUT,
            message,
            |mut c, r| async move { c.define_domain(r).await },
        )
        .await
    }

    /// Starts the domain of `uuid`; `track_writes`: the peer's copy equals its disks now, so
    /// the agent tracks the guest's writes from the start for an incremental first mirror;
    /// `resume_standby`: an FT failover resumes the standby there instead of booting.
    pub async fn start(
        &self,
        uuid: &str,
        token: Token,
        track_writes: bool,
        resume_standby: bool,
    ) -> Result<pb::DomainStatus, Error> {
        let message = pb::DomainCommand {
            track_writes,
            resume_standby,
            ..command(uuid, token)
        };
        self.call(
            "starting domain",
            CALL_TIMEOUT,
            message,
            |mut c, r| async move { c.start_domain(r).await },
        )
        .await
    }

    /// Presses the ACPI power button of `uuid`.
    pub async fn shutdown(&self, uuid: &str, token: Token) -> Result<pb::DomainStatus, Error> {
        let message = command(uuid, token);
        self.call(
            "shutting down domain",
            ACPI_TIMEOUT,
            message,
            |mut c, r| async move { c.shutdown_domain(r).await },
        )
        .await
    }

    /// Powers `uuid` off.
    pub async fn destroy(&self, uuid: &str, token: Token) -> Result<pb::DomainStatus, Error> {
        let message = command(uuid, token);
        self.call(
            "powering off domain",
            CALL_TIMEOUT,
            message,
            |mut c, r| async move { c.destroy_domain(r).await },
        )
        .await
    }

    /// Removes the definition of `uuid` (idempotent).
    pub async fn undefine(&self, uuid: &str, token: Token) -> Result<(), Error> {
        let message = command(uuid, token);
        self.call(
            "undefining domain",
            CALL_TIMEOUT,
            message,
            |mut c, r| async move { c.undefine_domain(r).await },
        )
        .await?;
        Ok(())
    }

    /// Streams `volume` of `vm`, or its snapshot `snapshot`, converted to a VMDK for an
    /// export. The call itself is bounded by [`CALL_TIMEOUT`]; the stream has no deadline (a
    /// large disk converts for long), it ends with the agent's last chunk or error.
    pub async fn export_volume(
        &self,
        vm: &VmRecord,
        volume: pb::VolumeRef,
        snapshot: Option<&str>,
        token: Token,
    ) -> Result<tonic::Streaming<pb::ExportVolumeChunk>, Error> {
        let message = pb::ExportVolumeRequest {
            vm_uuid: vm.uuid.clone(),
            volume: Some(volume),
            snapshot: snapshot.unwrap_or_default().to_string(),
            fence: fence(token),
        };
        let op = "exporting a volume";
        let mut client = self.client.clone();
        let call = client.export_volume(tonic::Request::new(message));
        self.opened(op, call).await
    }

    /// The serial console of `uuid`: its last `tail_bytes`, then new output if `follow`.
    pub async fn stream_serial(
        &self,
        uuid: &str,
        tail_bytes: u64,
        follow: bool,
    ) -> Result<tonic::Streaming<pb::SerialChunk>, Error> {
        let message = pb::StreamSerialRequest {
            uuid: uuid.to_string(),
            tail_bytes,
            follow,
        };
        Ok(self
            .client
            .clone()
            .stream_serial(tonic::Request::new(message))
            .await
            .map_err(self.failed("reading serial console"))?
            .into_inner())
    }

    /// A VNC session to running domain `uuid`'s screen: `input` (RFB bytes from the viewer)
    /// goes to its QEMU, the returned stream brings QEMU's bytes back. Fails at once when
    /// the domain has no screen on this host.
    pub async fn vnc<S>(&self, uuid: &str, input: S) -> Result<tonic::Streaming<pb::VncData>, Error>
    where
        S: tokio_stream::Stream<Item = Vec<u8>> + Send + 'static,
    {
        let first = pb::VncData {
            uuid: uuid.to_string(),
            data: Vec::new(),
        };
        let rest = tokio_stream::StreamExt::map(input, |data| pb::VncData {
            uuid: String::new(),
            data,
        });
        let requests = tokio_stream::StreamExt::chain(tokio_stream::once(first), rest);
        let op = "opening the VM's screen";
        let mut client = self.client.clone();
        let call = client.vnc(tonic::Request::new(requests));
        self.opened(op, call).await
    }

    /// The screen of running domain `uuid`, as PNG bytes.
    pub async fn screenshot(&self, uuid: &str) -> Result<Vec<u8>, Error> {
        let message = pb::ScreenshotRequest {
            uuid: uuid.to_string(),
        };
        Ok(self
            .client
            .clone()
            .screenshot(tonic::Request::new(message))
            .await
            .map_err(self.failed("taking a screenshot"))?
            .into_inner()
            .png)
    }
}

fn command(uuid: &str, token: Token) -> pb::DomainCommand {
    pb::DomainCommand {
        uuid: uuid.to_string(),
        fence: fence(token),
        track_writes: false,
        resume_standby: false,
    }
}

fn volume_format(format: DiskFormat) -> pb::VolumeFormat {
    match format {
        DiskFormat::Raw => pb::VolumeFormat::Raw,
        DiskFormat::Qcow2 => pb::VolumeFormat::Qcow2,
    }
}

/// The volumes of `vm` as the replica, snapshot and export calls name them, in disk order.
pub fn replica_volumes(vm: &VmRecord) -> Vec<pb::VolumeRef> {
    vm.disks
        .iter()
        .map(|d| pb::VolumeRef {
            storage_group: d.storage_group.clone(),
            volume: d.volume.clone(),
            format: volume_format(d.format).into(),
            size_bytes: d.size_bytes,
        })
        .collect()
}

fn snapshot_command(vm: &VmRecord, id: &str, token: Token) -> pb::SnapshotCommand {
    pb::SnapshotCommand {
        vm_uuid: vm.uuid.clone(),
        id: id.to_string(),
        volumes: replica_volumes(vm),
        fence: fence(token),
    }
}

/// The agent's VM spec for a VM record.
pub fn spec_of(vm: &VmRecord) -> pb::VmSpec {
    pb::VmSpec {
        uuid: vm.uuid.clone(),
        name: vm.name.clone(),
        vcpus: vm.vcpus,
        memory_mib: vm.memory_mib,
        disks: vm
            .disks
            .iter()
            .map(|d| pb::DiskSpec {
                storage_group: d.storage_group.clone(),
                volume: d.volume.clone(),
                format: volume_format(d.format).into(),
            })
            .collect(),
        nics: vm
            .nics
            .iter()
            .map(|n| pb::NicSpec {
                network: n.network.clone(),
                mac: n.mac.clone(),
            })
            .collect(),
        boot: Some(match &vm.boot {
            Boot::Kernel { image } => pb::vm_spec::Boot::KernelImage(image.clone()),
            Boot::Iso {
                name,
                storage_group,
            } => pb::vm_spec::Boot::Iso(pb::IsoRef {
                storage_group: storage_group.clone(),
                name: name.clone(),
            }),
        }),
        // The pair restarts a protected VM on the peer once this host's lease expires, so its
        // agent must have stopped it by then.
        self_fence: vm.mode != Mode::Unprotected,
        ft: vm.mode == Mode::Ft,
    }
}
