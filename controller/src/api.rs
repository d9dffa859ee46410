//! The public gRPC API (`pairvisor.v1`): translates requests into engine commands and back.
//!
//! On the serving controller a mutating call goes to the local [`EngineHandle`] and a read is
//! answered from the engine's snapshot (never queued behind an agent call); on the standby a
//! call is forwarded to the serving controller found through the etcd election (marked so it
//! is never forwarded twice, and keeping its request ID). Event and console streams are
//! read-only and served by any controller straight from etcd and the agents.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::store::Etcd;
use daemon::etcd::{WatchSpec, Watched};
use proto::v1 as pb;
use proto::v1::pairvisor_client::PairvisorClient;
use tokio::sync::{mpsc, watch};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status};

use crate::agents::AgentPool;
use crate::engine::{Command, EngineHandle, Modify, NodesView};
use crate::error::{ApiError, chain};
use crate::events::{self, Change, vm_state_to_pb};
use crate::health::{self, HostState};
use crate::model::{Boot, DiskFormat, DiskRequest, Mode, VmRecord, VmSpec};
use crate::store::{self, Alert, ELECTION, PREFIX};
use daemon::pair::LeaderInfo;

/// Metadata key marking a call forwarded by the standby controller.
const FORWARDED: &str = "x-pairvisor-forwarded";
/// Metadata key of a mutating call's request ID (a retry carries the same one).
pub const REQUEST_ID: &str = "x-pairvisor-request-id";
/// Grace period of a shutdown when the request gives none.
const DEFAULT_GRACE: Duration = Duration::from_secs(60);
/// Longest grace period a shutdown may ask for.
const MAX_GRACE_SECONDS: u32 = 3600;

/// Where this controller sends API calls.
#[derive(Clone, Debug)]
pub enum Route {
    /// This controller serves: to its engine.
    Local(EngineHandle),
    /// Another controller serves (or none yet): forward.
    Forward,
}

/// The public API service.
#[derive(Clone, Debug)]
pub struct Api {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    route: watch::Receiver<Route>,
    client: Etcd,
    agents: AgentPool,
    peers: Mutex<HashMap<String, PairvisorClient<Channel>>>,
}

enum Target {
    Local(EngineHandle),
    Peer(PairvisorClient<Channel>),
}

impl Api {
    /// An API that routes by `route`, reading etcd through `client`.
    pub fn new(route: watch::Receiver<Route>, client: Etcd, agents: AgentPool) -> Api {
        Api {
            inner: Arc::new(Inner {
                route,
                client,
                agents,
                peers: Mutex::new(HashMap::new()),
            }),
        }
    }

    async fn target<T>(&self, request: &Request<T>) -> Result<Target, Status> {
        if let Route::Local(engine) = &*self.inner.route.borrow() {
            return Ok(Target::Local(engine.clone()));
        }
        let election = || {
            ApiError::Unavailable(
                "no controller serves the pair right now (an election is in progress); retry in a few seconds"
                    .into(),
            )
        };
        if request.metadata().contains_key(FORWARDED) {
            return Err(election().into());
        }
        let leader = self
            .inner
            .client
            .request(
                "finding the serving controller",
                store::REQUEST_BUDGET,
                |mut c| async move { c.leader(ELECTION).await },
            )
            .await
            .map_err(|_| election())?;
        let info: LeaderInfo = leader
            .kv()
            .and_then(|kv| serde_json::from_slice(kv.value()).ok())
            .ok_or_else(election)?;
        Ok(Target::Peer(self.peer(&info.api_address)?))
    }

    fn peer(&self, address: &str) -> Result<PairvisorClient<Channel>, Status> {
        let mut peers = self
            .inner
            .peers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(client) = peers.get(address) {
            return Ok(client.clone());
        }
        let channel = Endpoint::from_shared(format!("http://{address}"))
            .map_err(|e| ApiError::Internal(format!("serving controller address {address}: {e}")))?
            .connect_timeout(Duration::from_secs(2))
            .http2_keep_alive_interval(Duration::from_secs(5))
            .keep_alive_timeout(Duration::from_secs(5))
            .keep_alive_while_idle(true)
            .connect_lazy();
        let client = PairvisorClient::new(channel);
        peers.insert(address.to_string(), client.clone());
        Ok(client)
    }
}

/// The same request, marked as forwarded, with its request ID.
fn forwarded<T>(request: Request<T>) -> Request<T> {
    let id = request.metadata().get(REQUEST_ID).cloned();
    let mut out = Request::new(request.into_inner());
    out.metadata_mut()
        .insert(FORWARDED, tonic::metadata::MetadataValue::from_static("1"));
    if let Some(id) = id {
        out.metadata_mut().insert(REQUEST_ID, id);
    }
    out
}

/// The request ID a call carries, if it carries a well-formed one.
fn request_id<T>(request: &Request<T>) -> Result<Option<String>, ApiError> {
    let Some(value) = request.metadata().get(REQUEST_ID) else {
        return Ok(None);
    };
    let id = value.to_str().unwrap_or_default();
    let well_formed =
        (8..=64).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    if !well_formed {
        return Err(ApiError::invalid(
            REQUEST_ID,
            "give 8 to 64 letters, digits or '-' (a UUID)",
        ));
    }
    Ok(Some(id.to_string()))
}

/// Runs `$body` with the local engine (and the call's request ID), or forwards the call to
/// the serving controller.
macro_rules! serve_or_forward {
    ($self:ident, $request:ident, $method:ident, |$engine:ident, $message:ident, $id:ident| $body:expr) => {
        match $self.target(&$request).await? {
            Target::Peer(mut peer) => peer.$method(forwarded($request)).await,
            Target::Local($engine) => {
                let $id = request_id(&$request)?;
                let $message = $request.into_inner();
                $body
            }
        }
    };
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::Event, Status>> + Send>>;
type ConsoleStream = Pin<Box<dyn Stream<Item = Result<pb::ConsoleChunk, Status>> + Send>>;

#[tonic::async_trait]
impl pb::pairvisor_server::Pairvisor for Api {
    async fn create_vm(
        &self,
        request: Request<pb::CreateVmRequest>,
    ) -> Result<Response<pb::Vm>, Status> {
        serve_or_forward!(self, request, create_vm, |engine, message, id| {
            let spec = spec_from_pb(message)?;
            let vm = engine
                .call(|reply| Command::Create {
                    spec,
                    request: id,
                    reply,
                })
                .await?;
            Ok(Response::new(vm_to_pb(&vm)))
        })
    }

    async fn start_vm(
        &self,
        request: Request<pb::StartVmRequest>,
    ) -> Result<Response<pb::Vm>, Status> {
        serve_or_forward!(self, request, start_vm, |engine, message, id| {
            let vm = engine
                .call(|reply| Command::Start {
                    vm: message.vm,
                    request: id,
                    reply,
                })
                .await?;
            Ok(Response::new(vm_to_pb(&vm)))
        })
    }

    async fn shutdown_vm(
        &self,
        request: Request<pb::ShutdownVmRequest>,
    ) -> Result<Response<pb::Vm>, Status> {
        serve_or_forward!(self, request, shutdown_vm, |engine, message, id| {
            let grace = grace_from_pb(message.grace_seconds)?;
            let vm = engine
                .call(|reply| Command::Shutdown {
                    vm: message.vm,
                    grace,
                    request: id,
                    reply,
                })
                .await?;
            Ok(Response::new(vm_to_pb(&vm)))
        })
    }

    async fn power_off_vm(
        &self,
        request: Request<pb::PowerOffVmRequest>,
    ) -> Result<Response<pb::Vm>, Status> {
        serve_or_forward!(self, request, power_off_vm, |engine, message, id| {
            let vm = engine
                .call(|reply| Command::PowerOff {
                    vm: message.vm,
                    request: id,
                    reply,
                })
                .await?;
            Ok(Response::new(vm_to_pb(&vm)))
        })
    }

    async fn delete_vm(
        &self,
        request: Request<pb::DeleteVmRequest>,
    ) -> Result<Response<pb::DeleteVmResponse>, Status> {
        serve_or_forward!(self, request, delete_vm, |engine, message, id| {
            let uuid = engine
                .call(|reply| Command::Delete {
                    vm: message.vm,
                    request: id,
                    reply,
                })
                .await?;
            Ok(Response::new(pb::DeleteVmResponse { uuid }))
        })
    }

    async fn modify_vm(
        &self,
        request: Request<pb::ModifyVmRequest>,
    ) -> Result<Response<pb::Vm>, Status> {
        serve_or_forward!(self, request, modify_vm, |engine, message, id| {
            let change = Modify {
                mode: message.mode.map(mode_from_pb).transpose()?,
                vcpus: message.vcpus,
                memory_mib: message.memory_mib,
            };
            let vm = engine
                .call(|reply| Command::Modify {
                    vm: message.vm,
                    change,
                    request: id,
                    reply,
                })
                .await?;
            Ok(Response::new(vm_to_pb(&vm)))
        })
    }

    async fn get_vm(&self, request: Request<pb::GetVmRequest>) -> Result<Response<pb::Vm>, Status> {
        serve_or_forward!(self, request, get_vm, |engine, message, _id| {
            let vm = engine.snapshot().vm(&message.vm)?;
            Ok(Response::new(vm_to_pb(&vm)))
        })
    }

    async fn list_vms(
        &self,
        request: Request<pb::ListVmsRequest>,
    ) -> Result<Response<pb::ListVmsResponse>, Status> {
        serve_or_forward!(self, request, list_vms, |engine, _message, _id| {
            let snapshot = engine.snapshot();
            Ok(Response::new(pb::ListVmsResponse {
                vms: snapshot.vms.values().map(vm_to_pb).collect(),
            }))
        })
    }

    async fn list_nodes(
        &self,
        request: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        serve_or_forward!(self, request, list_nodes, |engine, _message, _id| {
            Ok(Response::new(nodes_to_pb(&engine.snapshot().nodes)))
        })
    }

    async fn list_alerts(
        &self,
        request: Request<pb::ListAlertsRequest>,
    ) -> Result<Response<pb::ListAlertsResponse>, Status> {
        serve_or_forward!(self, request, list_alerts, |engine, _message, _id| {
            Ok(Response::new(pb::ListAlertsResponse {
                alerts: engine.snapshot().alerts.values().map(alert_to_pb).collect(),
            }))
        })
    }

    async fn get_health_config(
        &self,
        request: Request<pb::GetHealthConfigRequest>,
    ) -> Result<Response<pb::HealthConfig>, Status> {
        serve_or_forward!(self, request, get_health_config, |engine, _message, _id| {
            Ok(Response::new(health_config_to_pb(
                engine.snapshot().health_config,
            )))
        })
    }

    async fn set_health_config(
        &self,
        request: Request<pb::HealthConfig>,
    ) -> Result<Response<pb::HealthConfig>, Status> {
        serve_or_forward!(self, request, set_health_config, |engine, message, _id| {
            let config = health::Config {
                path_timeout_ms: message.path_timeout_ms,
                lost_confirm_ms: message.lost_confirm_ms,
            };
            let config = engine
                .call(|reply| Command::SetHealthConfig { config, reply })
                .await?;
            Ok(Response::new(health_config_to_pb(config)))
        })
    }

    type WatchEventsStream = EventStream;

    async fn watch_events(
        &self,
        request: Request<pb::WatchEventsRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let since = request.into_inner().since_revision;
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(stream_events(self.inner.client.clone(), since, tx));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type StreamConsoleStream = ConsoleStream;

    async fn stream_console(
        &self,
        request: Request<pb::StreamConsoleRequest>,
    ) -> Result<Response<ConsoleStream>, Status> {
        let message = request.into_inner();
        let unavailable = |e: store::Error| ApiError::Unavailable(chain(&e));
        let client = &self.inner.client;
        let vm = store::find_vm(client, &message.vm)
            .await
            .map_err(unavailable)?
            .ok_or_else(|| ApiError::NotFound {
                vm: message.vm.clone(),
            })?;
        let node = store::find_node(client, &vm.node)
            .await
            .map_err(unavailable)?
            .ok_or_else(|| {
                ApiError::Unavailable(format!("node {} of VM {} is down", vm.node, vm.name))
            })?;
        let agent = self
            .inner
            .agents
            .get(&node.name, &node.agent_address)
            .map_err(|e| ApiError::Internal(chain(&e)))?;
        let serial = agent
            .stream_serial(&vm.uuid, message.tail_bytes, message.follow)
            .await
            .map_err(|e| ApiError::Unavailable(chain(&e)))?;
        let stream = tokio_stream::StreamExt::map(serial, |chunk| {
            chunk.map(|c| pb::ConsoleChunk {
                offset: c.offset,
                data: c.data,
            })
        });
        Ok(Response::new(Box::pin(stream)))
    }
}

/// Sends the pair's events from revision `since` (0: from now) until the receiver goes away.
async fn stream_events(etcd: Etcd, since: i64, tx: mpsc::Sender<Result<pb::Event, Status>>) {
    let mut watch = etcd.watch(WatchSpec {
        key: PREFIX.to_string(),
        prefix: true,
        start_revision: since,
    });
    loop {
        let watched = tokio::select! {
            watched = watch.recv() => watched,
            () = tx.closed() => return,
        };
        match watched {
            Some(Watched::Events(events)) => {
                for event in &events {
                    if let Some(api_event) = api_event(event)
                        && tx.send(Ok(api_event)).await.is_err()
                    {
                        return;
                    }
                }
            }
            Some(Watched::Cancelled { reason }) => {
                let reason = format!("event watch cancelled: {reason}");
                let _ = tx
                    .send(Err(ApiError::FailedPrecondition(reason).into()))
                    .await;
                return;
            }
            None => return,
        }
    }
}

/// The API event a watched change means, if any.
fn api_event(event: &etcd_client::Event) -> Option<pb::Event> {
    let kv = event.kv()?;
    let is_put = matches!(event.event_type(), etcd_client::EventType::Put);
    let change = Change {
        revision: kv.mod_revision(),
        key: &String::from_utf8_lossy(kv.key()),
        value: is_put.then(|| kv.value()),
        prev: event.prev_kv().map(|p| p.value()),
        now_unix_ms: crate::now_unix_ms(),
    };
    events::from_change(&change)
}

fn grace_from_pb(seconds: u32) -> Result<Duration, ApiError> {
    match seconds {
        0 => Ok(DEFAULT_GRACE),
        s if s <= MAX_GRACE_SECONDS => Ok(Duration::from_secs(u64::from(s))),
        s => Err(ApiError::invalid(
            "grace_seconds",
            format!(
                "{s} is too long; give 1 to {MAX_GRACE_SECONDS} seconds, or 0 for the default of 60"
            ),
        )),
    }
}

fn mode_from_pb(mode: i32) -> Result<Mode, ApiError> {
    match pb::ProtectionMode::try_from(mode) {
        Ok(pb::ProtectionMode::Ft) => Ok(Mode::Ft),
        Ok(pb::ProtectionMode::Ha) => Ok(Mode::Ha),
        Ok(pb::ProtectionMode::Unprotected) => Ok(Mode::Unprotected),
        Ok(pb::ProtectionMode::Invalid) | Err(_) => Err(ApiError::invalid(
            "mode",
            "choose a protection mode: ft, ha or unprotected",
        )),
    }
}

fn mode_to_pb(mode: Mode) -> pb::ProtectionMode {
    match mode {
        Mode::Ft => pb::ProtectionMode::Ft,
        Mode::Ha => pb::ProtectionMode::Ha,
        Mode::Unprotected => pb::ProtectionMode::Unprotected,
    }
}

fn format_from_pb(format: i32) -> Result<DiskFormat, ApiError> {
    match pb::DiskFormat::try_from(format) {
        Ok(pb::DiskFormat::Invalid | pb::DiskFormat::Raw) => Ok(DiskFormat::Raw),
        Ok(pb::DiskFormat::Qcow2) => Ok(DiskFormat::Qcow2),
        Err(_) => Err(ApiError::invalid("disks.format", "choose raw or qcow2")),
    }
}

fn format_to_pb(format: DiskFormat) -> pb::DiskFormat {
    match format {
        DiskFormat::Raw => pb::DiskFormat::Raw,
        DiskFormat::Qcow2 => pb::DiskFormat::Qcow2,
    }
}

/// The model's VM spec for a create request.
fn spec_from_pb(message: pb::CreateVmRequest) -> Result<VmSpec, ApiError> {
    let disks = message
        .disks
        .iter()
        .map(|d| {
            Ok(DiskRequest {
                size_bytes: d.size_bytes,
                storage_group: d.storage_group.clone(),
                format: format_from_pb(d.format)?,
            })
        })
        .collect::<Result<_, ApiError>>()?;
    let boot = match message.boot {
        Some(pb::create_vm_request::Boot::KernelImage(image)) => Boot::Kernel { image },
        Some(pb::create_vm_request::Boot::IsoPath(path)) => Boot::Iso { path },
        None => {
            return Err(ApiError::invalid(
                "boot",
                "give a boot source: a kernel image (e.g. tiny) or an ISO path",
            ));
        }
    };
    Ok(VmSpec {
        name: message.name,
        mode: mode_from_pb(message.mode)?,
        vcpus: message.vcpus,
        memory_mib: message.memory_mib,
        disks,
        networks: message.networks,
        boot,
    })
}

/// The API's view of a VM record.
pub fn vm_to_pb(vm: &VmRecord) -> pb::Vm {
    let deadline = match vm.state {
        crate::model::VmState::Stopping {
            deadline_unix_ms,
            forced: false,
        } => deadline_unix_ms,
        _ => 0,
    };
    pb::Vm {
        uuid: vm.uuid.clone(),
        name: vm.name.clone(),
        mode: mode_to_pb(vm.mode).into(),
        vcpus: vm.vcpus,
        memory_mib: vm.memory_mib,
        disks: vm
            .disks
            .iter()
            .zip(0u32..)
            .map(|(d, index)| pb::Disk {
                index,
                size_bytes: d.size_bytes,
                storage_group: d.storage_group.clone(),
                format: format_to_pb(d.format).into(),
                volume: d.volume.clone(),
            })
            .collect(),
        nics: vm
            .nics
            .iter()
            .map(|n| pb::Nic {
                network: n.network.clone(),
                mac: n.mac.clone(),
            })
            .collect(),
        boot: Some(match &vm.boot {
            Boot::Kernel { image } => pb::vm::Boot::KernelImage(image.clone()),
            Boot::Iso { path } => pb::vm::Boot::IsoPath(path.clone()),
        }),
        state: vm_state_to_pb(vm.state).into(),
        state_reason: vm.state_reason.clone(),
        node: vm.node.clone(),
        created_unix_ms: vm.created_unix_ms,
        updated_unix_ms: vm.updated_unix_ms,
        shutdown_deadline_unix_ms: deadline,
        protection: (vm.mode != crate::model::Mode::Unprotected)
            .then(|| protection_to_pb(&vm.protection)),
    }
}

fn protection_to_pb(p: &crate::ha::Protection) -> pb::Protection {
    use crate::ha::Sync;
    let (reason, since_unix_ms, done, total) = match &p.sync {
        Sync::Off => (String::new(), 0, 0, 0),
        Sync::Syncing {
            done,
            total,
            since_unix_ms,
            ..
        } => (String::new(), *since_unix_ms, *done, *total),
        Sync::Protected { since_unix_ms } => (String::new(), *since_unix_ms, 0, 0),
        Sync::Simplex {
            reason,
            since_unix_ms,
        } => (reason.clone(), *since_unix_ms, 0, 0),
    };
    let progress = p.sync.progress(crate::now_unix_ms());
    pb::Protection {
        state: p.sync.name().to_string(),
        reason,
        since_unix_ms,
        sync_done_bytes: done,
        sync_total_bytes: total,
        sync_bytes_per_second: progress.map_or(0, |g| g.bytes_per_second),
        sync_eta_seconds: progress.and_then(|g| g.eta_seconds),
        sync_percent: progress.map_or(0, |g| u32::try_from(g.percent).unwrap_or(100)),
        sync_phase: p.sync.phase().unwrap_or_default().to_string(),
        current_on: p.current.iter().cloned().collect(),
        last_failover: p.last_failover.as_ref().map(|f| pb::Failover {
            from_node: f.from.clone(),
            to_node: f.to.clone(),
            reason: f.reason.clone(),
            decided_unix_ms: f.decided_unix_ms,
            running_unix_ms: f.running_unix_ms.unwrap_or(0),
        }),
    }
}

fn nodes_to_pb(view: &NodesView) -> pb::ListNodesResponse {
    let nodes = view
        .nodes
        .iter()
        .map(|n| {
            let role = if n.record.name == view.serving {
                pb::NodeRole::Serving
            } else {
                pb::NodeRole::Standby
            };
            let state = match n.health {
                HostState::Up => pb::NodeState::Up,
                HostState::Suspect => pb::NodeState::Suspect,
                HostState::Lost => pb::NodeState::Lost,
                HostState::Fenced => pb::NodeState::Fenced,
            };
            let facts = &n.record.facts;
            pb::Node {
                name: n.record.name.clone(),
                role: role.into(),
                state: state.into(),
                api_address: n.api_address.clone(),
                cpus: facts.cpus,
                memory_mib: facts.memory_mib,
                storage_groups: facts
                    .storage_groups
                    .iter()
                    .map(|(name, g)| pb::StorageGroup {
                        name: name.clone(),
                        total_bytes: g.total_bytes,
                        free_bytes: g.free_bytes,
                    })
                    .collect(),
                networks: facts.networks.iter().cloned().collect(),
                boot_images: facts.boot_images.iter().cloned().collect(),
                qemu_version: facts.qemu_version.clone(),
                libvirt_version: facts.libvirt_version.clone(),
                running_vms: n.running_vms,
                state_reason: n.health_reason.clone(),
                lease_alive: n.lease_alive,
                agent_up: n.agent_up,
                controller_up: n.controller_up,
                paths: n
                    .paths
                    .iter()
                    .map(|p| pb::HeartbeatPath {
                        name: p.name.clone(),
                        up: p.up,
                        ms_since_heard: p.since_ms,
                    })
                    .collect(),
            }
        })
        .collect();
    pb::ListNodesResponse {
        nodes,
        capacity: Some(pb::Capacity {
            free_vcpus: u32::try_from(view.free.vcpus).unwrap_or(u32::MAX),
            free_memory_mib: view.free.memory_mib,
        }),
    }
}

fn alert_to_pb(alert: &Alert) -> pb::Alert {
    pb::Alert {
        id: alert.id.clone(),
        node: alert.node.clone(),
        vm_uuid: alert.vm.clone(),
        message: alert.message.clone(),
        raised_unix_ms: alert.raised_unix_ms,
    }
}

fn health_config_to_pb(config: health::Config) -> pb::HealthConfig {
    pb::HealthConfig {
        path_timeout_ms: config.path_timeout_ms,
        lost_confirm_ms: config.lost_confirm_ms,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> pb::CreateVmRequest {
        pb::CreateVmRequest {
            name: "web".into(),
            mode: pb::ProtectionMode::Ft.into(),
            vcpus: 2,
            memory_mib: 512,
            disks: vec![pb::DiskRequest {
                size_bytes: 1 << 20,
                storage_group: "sg0".into(),
                format: pb::DiskFormat::Invalid.into(),
            }],
            networks: vec![],
            boot: Some(pb::create_vm_request::Boot::KernelImage("tiny".into())),
        }
    }

    #[test]
    fn spec_from_pb_defaults_disk_format_to_raw() {
        let spec = spec_from_pb(request()).unwrap();

        assert_eq!(spec.disks[0].format, DiskFormat::Raw);
        assert_eq!(spec.mode, Mode::Ft);
    }

    #[test]
    fn spec_from_pb_without_mode_is_refused() {
        let message = pb::CreateVmRequest {
            mode: pb::ProtectionMode::Invalid.into(),
            ..request()
        };

        let err = spec_from_pb(message).unwrap_err();

        assert_eq!(
            err.to_string(),
            "mode: choose a protection mode: ft, ha or unprotected"
        );
    }

    #[test]
    fn spec_from_pb_without_boot_is_refused() {
        let message = pb::CreateVmRequest {
            boot: None,
            ..request()
        };

        let err = spec_from_pb(message).unwrap_err();

        assert!(matches!(err, ApiError::InvalidArgument { ref field, .. } if field == "boot"));
    }

    #[test]
    fn grace_zero_means_default() {
        let grace = grace_from_pb(0).unwrap();

        assert_eq!(grace, DEFAULT_GRACE);
    }

    #[test]
    fn grace_over_an_hour_is_refused() {
        let err = grace_from_pb(MAX_GRACE_SECONDS + 1).unwrap_err();

        assert!(matches!(err, ApiError::InvalidArgument { .. }));
    }
}
