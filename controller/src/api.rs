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
use proto::v1 as pb;
use proto::v1::pairvisor_client::PairvisorClient;
use tokio::sync::watch;
use tokio_stream::Stream;
use tonic::transport::{Channel, ClientTlsConfig};
use tonic::{Request, Response, Status};

use crate::agents::AgentPool;
use crate::audit::{self, Audit, Subject};
use crate::auth::tokens::Tokens;
use crate::engine::{Command, EngineHandle, Modify};
use crate::error::{ApiError, chain};
use crate::health;
use crate::model::VmRecord;
use crate::store::{self, ELECTION};
use daemon::pair::LeaderInfo;

mod access;
mod convert;
mod event_watch;
mod export;
mod import;
mod isos;
mod snapshots;

pub use event_watch::REVISION_HEADER;

use convert::{
    alert_to_pb, grace_from_pb, health_config_to_pb, mode_from_pb, nodes_to_pb, spec_from_pb,
    vm_to_pb,
};

/// Metadata key marking a call forwarded by the standby controller.
const FORWARDED: &str = "x-pairvisor-forwarded";
/// Metadata key of a mutating call's request ID (a retry carries the same one).
pub const REQUEST_ID: &str = "x-pairvisor-request-id";

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

/// How long ListNodes waits for each etcd member's status: a dead witness costs this once
/// per call (members are asked at once).
const QUORUM_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Debug)]
struct Inner {
    route: watch::Receiver<Route>,
    client: Etcd,
    agents: AgentPool,
    peers: Mutex<HashMap<String, PairvisorClient<Channel>>>,
    /// TLS to the peer's public API, for forwarded calls; `None` forwards in plain HTTP/2.
    peer_tls: Option<ClientTlsConfig>,
    /// The pair's tokens (`None`: the API runs without them, tests only).
    tokens: Option<Arc<Tokens>>,
    /// The audit log.
    audit: Arc<Audit>,
}

/// What guards the API: its tokens, its audit log, and the calls' metrics.
#[derive(Clone, Debug)]
pub struct Access {
    /// The pair's tokens (`None`: every call is admitted, tests only).
    pub tokens: Option<Arc<Tokens>>,
    /// The audit log.
    pub audit: Arc<Audit>,
    /// Counts and latencies of the calls.
    pub metrics: Arc<crate::metrics::Metrics>,
}

enum Target {
    Local(EngineHandle),
    Peer(PairvisorClient<Channel>),
}

impl Api {
    /// An API that routes by `route`, reading etcd through `client`.
    pub fn new(
        route: watch::Receiver<Route>,
        client: Etcd,
        agents: AgentPool,
        peer_tls: Option<ClientTlsConfig>,
        access: Access,
    ) -> Api {
        Api {
            inner: Arc::new(Inner {
                route,
                client,
                agents,
                peers: Mutex::new(HashMap::new()),
                peer_tls,
                tokens: access.tokens,
                audit: access.audit,
            }),
        }
    }

    /// The pair as the API shows it, if this controller serves (for `/metrics`).
    pub fn pair_view(&self) -> Option<crate::metrics::PairView> {
        let engine = match &*self.inner.route.borrow() {
            Route::Local(engine) => engine.clone(),
            Route::Forward => return None,
        };
        let snapshot = engine.snapshot();
        Some(crate::metrics::PairView {
            vms: snapshot
                .vms
                .values()
                .map(|vm| vm_to_pb(vm, snapshot.ft(vm), snapshot.disk_writes(vm)))
                .collect(),
            nodes: nodes_to_pb(&snapshot.nodes).nodes,
            alerts: snapshot.alerts.values().filter(|a| a.open()).count(),
        })
    }

    /// VM `vm` (a name or UUID) and the agent of the host it runs on, read from etcd: what
    /// any controller serves the VM's console and screen through.
    pub(crate) async fn agent_of(
        &self,
        vm: &str,
    ) -> Result<(VmRecord, crate::agents::Agent), ApiError> {
        let unavailable = |e: store::Error| ApiError::Unavailable(chain(&e));
        let client = &self.inner.client;
        let vm = store::find_vm(client, vm)
            .await
            .map_err(unavailable)?
            .ok_or_else(|| ApiError::NotFound { vm: vm.to_string() })?;
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
        Ok((vm, agent))
    }

    /// Records `result` of the call `request` was in the audit log, if its method is audited.
    async fn audit(&self, request: &Audited, id: Option<&str>, outcome: String) {
        if let Some((caller, subject)) = request {
            self.inner
                .audit
                .record(caller, subject.clone(), id, outcome)
                .await;
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
        let endpoint = proto::transport::endpoint_at(address, self.inner.peer_tls.as_ref())
            .map_err(|e| {
                ApiError::Internal(format!("serving controller address {address}: {e}"))
            })?;
        let channel = endpoint
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

/// The caller and subject of a call to record in the audit log (`None`: not audited).
type Audited = Option<(crate::auth::Caller, String)>;

/// What the audit log records of `request`, if its method is audited.
fn audit_of<T: Subject>(request: &Request<T>) -> Audited {
    let caller = access::caller(request).ok()?;
    caller
        .audited()
        .then(|| (caller, request.get_ref().subject()))
}

/// The same request, marked as forwarded, with its request ID and token (the serving
/// controller checks the token again).
fn forwarded<T>(request: Request<T>) -> Request<T> {
    let keep =
        [REQUEST_ID, proto::auth::AUTHORIZATION].map(|key| request.metadata().get(key).cloned());
    let mut out = Request::new(request.into_inner());
    out.metadata_mut()
        .insert(FORWARDED, tonic::metadata::MetadataValue::from_static("1"));
    for (key, value) in [REQUEST_ID, proto::auth::AUTHORIZATION]
        .into_iter()
        .zip(keep)
    {
        if let Some(value) = value {
            out.metadata_mut().insert(key, value);
        }
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

/// The reply to a call about VM `vm`: its record with the engine's FT view of it.
fn vm_reply(engine: &EngineHandle, vm: &VmRecord) -> Response<pb::Vm> {
    let snapshot = engine.snapshot();
    Response::new(vm_to_pb(vm, snapshot.ft(vm), snapshot.disk_writes(vm)))
}

/// Runs `$body` with the local engine (and the call's request ID), recording an admin
/// call's outcome in the audit log, or forwards the call to the serving controller.
macro_rules! serve_or_forward {
    ($self:ident, $request:ident, $method:ident, |$engine:ident, $message:ident, $id:ident| $body:expr) => {
        match $self.target(&$request).await? {
            Target::Peer(mut peer) => peer.$method(forwarded($request)).await,
            Target::Local($engine) => {
                let $id = request_id(&$request)?;
                let audited = audit_of(&$request);
                let recorded_id = $id.clone();
                let $message = $request.into_inner();
                let result: Result<_, Status> = async { $body }.await;
                $self
                    .audit(&audited, recorded_id.as_deref(), audit::outcome(&result))
                    .await;
                result
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
            Ok(vm_reply(&engine, &vm))
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
            Ok(vm_reply(&engine, &vm))
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
            Ok(vm_reply(&engine, &vm))
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
            Ok(vm_reply(&engine, &vm))
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
            Ok(vm_reply(&engine, &vm))
        })
    }

    async fn get_vm(&self, request: Request<pb::GetVmRequest>) -> Result<Response<pb::Vm>, Status> {
        serve_or_forward!(self, request, get_vm, |engine, message, _id| {
            let snapshot = engine.snapshot();
            let vm = snapshot.vm(&message.vm)?;
            Ok(Response::new(vm_to_pb(
                &vm,
                snapshot.ft(&vm),
                snapshot.disk_writes(&vm),
            )))
        })
    }

    async fn list_vms(
        &self,
        request: Request<pb::ListVmsRequest>,
    ) -> Result<Response<pb::ListVmsResponse>, Status> {
        serve_or_forward!(self, request, list_vms, |engine, _message, _id| {
            let snapshot = engine.snapshot();
            Ok(Response::new(pb::ListVmsResponse {
                vms: snapshot
                    .vms
                    .values()
                    .map(|vm| vm_to_pb(vm, snapshot.ft(vm), snapshot.disk_writes(vm)))
                    .collect(),
            }))
        })
    }

    async fn list_nodes(
        &self,
        request: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        serve_or_forward!(self, request, list_nodes, |engine, _message, _id| {
            let mut nodes = nodes_to_pb(&engine.snapshot().nodes);
            nodes.quorum = self
                .inner
                .client
                .member_health(QUORUM_TIMEOUT)
                .await
                .into_iter()
                .map(|m| pb::QuorumMember {
                    name: m.name,
                    endpoint: m.endpoint,
                    up: m.up,
                    leader: m.leader,
                })
                .collect();
            Ok(Response::new(nodes))
        })
    }

    async fn list_alerts(
        &self,
        request: Request<pb::ListAlertsRequest>,
    ) -> Result<Response<pb::ListAlertsResponse>, Status> {
        serve_or_forward!(self, request, list_alerts, |engine, message, _id| {
            let snapshot = engine.snapshot();
            let alerts = snapshot
                .alerts
                .values()
                .filter(|a| a.open() || message.include_cleared)
                .map(alert_to_pb)
                .collect();
            Ok(Response::new(pb::ListAlertsResponse { alerts }))
        })
    }

    async fn clear_alert(
        &self,
        request: Request<pb::ClearAlertRequest>,
    ) -> Result<Response<pb::Alert>, Status> {
        let by = access::caller(&request)?.name;
        serve_or_forward!(self, request, clear_alert, |engine, message, _id| {
            let id = message.id;
            let alert = engine
                .call(|reply| Command::ClearAlert { id, by, reply })
                .await?;
            Ok(Response::new(alert_to_pb(&alert)))
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

    async fn create_snapshot(
        &self,
        request: Request<pb::CreateSnapshotRequest>,
    ) -> Result<Response<pb::CreateSnapshotResponse>, Status> {
        serve_or_forward!(self, request, create_snapshot, |engine, message, id| {
            let consistency = snapshots::ask_from_pb(message.consistency());
            let vm = message.vm;
            let (snapshot, warnings) = engine
                .call(|reply| Command::SnapshotCreate {
                    consistency,
                    request: id,
                    vm: vm.clone(),
                    description: message.description,
                    reply,
                })
                .await?;
            let name = engine.snapshot().vm(&vm).map_or(vm, |v| v.name);
            Ok(Response::new(pb::CreateSnapshotResponse {
                snapshot: Some(snapshots::to_pb(&name, &snapshot)),
                warnings,
            }))
        })
    }

    async fn list_snapshots(
        &self,
        request: Request<pb::ListSnapshotsRequest>,
    ) -> Result<Response<pb::ListSnapshotsResponse>, Status> {
        serve_or_forward!(self, request, list_snapshots, |engine, message, _id| {
            let vm = engine.snapshot().vm(&message.vm)?;
            Ok(Response::new(pb::ListSnapshotsResponse {
                snapshots: vm
                    .snapshots
                    .iter()
                    .map(|s| snapshots::to_pb(&vm.name, s))
                    .collect(),
            }))
        })
    }

    async fn delete_snapshot(
        &self,
        request: Request<pb::DeleteSnapshotRequest>,
    ) -> Result<Response<pb::DeleteSnapshotResponse>, Status> {
        serve_or_forward!(self, request, delete_snapshot, |engine, message, _id| {
            engine
                .call(|reply| Command::SnapshotDelete {
                    vm: message.vm,
                    id: message.id,
                    reply,
                })
                .await?;
            Ok(Response::new(pb::DeleteSnapshotResponse {}))
        })
    }

    async fn restore_snapshot(
        &self,
        request: Request<pb::RestoreSnapshotRequest>,
    ) -> Result<Response<pb::Vm>, Status> {
        serve_or_forward!(self, request, restore_snapshot, |engine, message, _id| {
            let vm = engine
                .call(|reply| Command::SnapshotRestore {
                    vm: message.vm,
                    id: message.id,
                    reply,
                })
                .await?;
            Ok(vm_reply(&engine, &vm))
        })
    }

    type ExportVmStream = export::ExportStream;

    async fn export_vm(
        &self,
        request: Request<pb::ExportVmRequest>,
    ) -> Result<Response<export::ExportStream>, Status> {
        match self.target(&request).await? {
            Target::Peer(mut peer) => {
                let stream = peer.export_vm(forwarded(request)).await?.into_inner();
                Ok(Response::new(Box::pin(stream)))
            }
            Target::Local(engine) => {
                let audited = audit_of(&request);
                let result = export::serve(engine, request.into_inner())
                    .await
                    .map(Response::new)
                    .map_err(Status::from);
                self.audit(&audited, None, audit::outcome(&result)).await;
                result
            }
        }
    }

    async fn add_iso(
        &self,
        request: Request<tonic::Streaming<pb::AddIsoRequest>>,
    ) -> Result<Response<pb::Iso>, Status> {
        match self.target(&request).await? {
            Target::Peer(mut peer) => {
                // A broken upload ends the forwarded stream early: the serving controller
                // then refuses it for its missing bytes or checksum.
                let request = forwarded(request)
                    .map(|parts| tokio_stream::StreamExt::map_while(parts, Result::ok));
                peer.add_iso(request).await
            }
            Target::Local(engine) => {
                let caller = access::caller(&request)?;
                let result = isos::add(engine, request.into_inner())
                    .await
                    .map(Response::new)
                    .map_err(Status::from);
                let subject = result
                    .as_ref()
                    .map_or(String::new(), |iso| format!("ISO {}", iso.get_ref().name));
                self.audit(&Some((caller, subject)), None, audit::outcome(&result))
                    .await;
                result
            }
        }
    }

    async fn import_vm(
        &self,
        request: Request<tonic::Streaming<pb::ImportVmRequest>>,
    ) -> Result<Response<pb::Vm>, Status> {
        match self.target(&request).await? {
            Target::Peer(mut peer) => {
                // A broken import ends the forwarded stream early: the serving controller
                // then refuses it for its missing bytes or checksum.
                let request = forwarded(request)
                    .map(|parts| tokio_stream::StreamExt::map_while(parts, Result::ok));
                peer.import_vm(request).await
            }
            Target::Local(engine) => {
                let caller = access::caller(&request)?;
                let result = import::import(engine.clone(), request.into_inner())
                    .await
                    .map(|vm| vm_reply(&engine, &vm))
                    .map_err(Status::from);
                let subject = result
                    .as_ref()
                    .map_or(String::new(), |vm| vm.get_ref().name.clone());
                self.audit(&Some((caller, subject)), None, audit::outcome(&result))
                    .await;
                result
            }
        }
    }

    async fn list_isos(
        &self,
        request: Request<pb::ListIsosRequest>,
    ) -> Result<Response<pb::ListIsosResponse>, Status> {
        serve_or_forward!(self, request, list_isos, |engine, _message, _id| {
            Ok(Response::new(isos::list(&engine.snapshot())))
        })
    }

    async fn delete_iso(
        &self,
        request: Request<pb::DeleteIsoRequest>,
    ) -> Result<Response<pb::DeleteIsoResponse>, Status> {
        serve_or_forward!(self, request, delete_iso, |engine, message, _id| {
            engine
                .call(|reply| Command::IsoDelete {
                    name: message.name,
                    reply,
                })
                .await?;
            Ok(Response::new(pb::DeleteIsoResponse {}))
        })
    }

    async fn who_am_i(
        &self,
        request: Request<pb::WhoAmIRequest>,
    ) -> Result<Response<pb::Caller>, Status> {
        access::who_am_i(&request)
    }

    async fn create_token(
        &self,
        request: Request<pb::CreateTokenRequest>,
    ) -> Result<Response<pb::CreateTokenResponse>, Status> {
        let inner = &self.inner;
        access::create_token(inner.tokens.as_deref(), &inner.audit, request).await
    }

    async fn list_tokens(
        &self,
        _request: Request<pb::ListTokensRequest>,
    ) -> Result<Response<pb::ListTokensResponse>, Status> {
        access::list_tokens(self.inner.tokens.as_deref()).await
    }

    async fn delete_token(
        &self,
        request: Request<pb::DeleteTokenRequest>,
    ) -> Result<Response<pb::DeleteTokenResponse>, Status> {
        let inner = &self.inner;
        access::delete_token(inner.tokens.as_deref(), &inner.audit, request).await
    }

    async fn list_audit(
        &self,
        request: Request<pb::ListAuditRequest>,
    ) -> Result<Response<pb::ListAuditResponse>, Status> {
        access::list_audit(&self.inner.audit, request).await
    }

    type WatchEventsStream = EventStream;

    async fn watch_events(
        &self,
        request: Request<pb::WatchEventsRequest>,
    ) -> Result<Response<EventStream>, Status> {
        event_watch::events(&self.inner.client, request.into_inner().since_revision).await
    }

    type StreamConsoleStream = ConsoleStream;

    async fn stream_console(
        &self,
        request: Request<pb::StreamConsoleRequest>,
    ) -> Result<Response<ConsoleStream>, Status> {
        let message = request.into_inner();
        let (vm, agent) = self.agent_of(&message.vm).await?;
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

    async fn screenshot_vm(
        &self,
        request: Request<pb::ScreenshotVmRequest>,
    ) -> Result<Response<pb::ScreenshotVmResponse>, Status> {
        let (vm, agent) = self.agent_of(&request.into_inner().vm).await?;
        let png = agent.screenshot(&vm.uuid).await.map_err(ApiError::from)?;
        Ok(Response::new(pb::ScreenshotVmResponse { png }))
    }
}
