//! Clients of the nodes' agents, one lazily connected channel per agent address. Every
//! mutating call carries a [`Token`]: the serving term and the VM's ownership generation,
//! which the agent checks against the highest it has seen.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proto::agent as pb;
use proto::agent::agent_client::AgentClient;
use tonic::transport::{Channel, Endpoint};

use crate::model::{Boot, DiskFormat, VmRecord};

/// How long to wait for an agent to accept a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// HTTP/2 keep-alive interval and timeout: a connection to a host that lost power is noticed
/// in seconds, not when TCP gives up.
const KEEP_ALIVE: Duration = Duration::from_secs(5);
/// Longest agent call: the first define on a fresh embed root runs QEMU's capability probe.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Timeout of the periodic state polls, short so a dead node is noticed quickly.
pub const POLL_TIMEOUT: Duration = Duration::from_secs(2);
/// Timeout of the health polls (several a second).
pub const HEALTH_TIMEOUT: Duration = Duration::from_millis(300);

pub use daemon::fence::Token;

/// A token as the agent API carries it.
fn fence(token: Token) -> Option<pb::Fence> {
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
}

/// One node's agent.
#[derive(Clone, Debug)]
pub struct Agent {
    node: String,
    client: AgentClient<Channel>,
}

impl AgentPool {
    /// The agent of `node` at `address`.
    pub fn get(&self, node: &str, address: &str) -> Result<Agent, Error> {
        let mut channels = self
            .channels
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let channel = match channels.get(address) {
            Some(channel) => channel.clone(),
            None => {
                let channel = Endpoint::from_shared(format!("http://{address}"))
                    .map_err(|source| Error::Endpoint {
                        node: node.to_string(),
                        address: address.to_string(),
                        source,
                    })?
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

impl Agent {
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

    /// What this host hears of its peer, its highest term and its lease.
    pub async fn peer_health(&self) -> Result<pb::PeerHealth, Error> {
        Ok(self
            .client
            .clone()
            .get_peer_health(request(pb::GetPeerHealthRequest {}, HEALTH_TIMEOUT))
            .await
            .map_err(self.failed("reading peer health"))?
            .into_inner())
    }

    /// Every domain of the host.
    pub async fn list_domains(&self) -> Result<Vec<pb::DomainStatus>, Error> {
        Ok(self
            .client
            .clone()
            .list_domains(request(pb::ListDomainsRequest {}, POLL_TIMEOUT))
            .await
            .map_err(self.failed("listing domains"))?
            .into_inner()
            .domains)
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
            self.client
                .clone()
                .create_volume(request(message, CALL_TIMEOUT))
                .await
                .map_err(self.failed("creating volume"))?;
        }
        Ok(())
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
            self.client
                .clone()
                .delete_volume(request(message, CALL_TIMEOUT))
                .await
                .map_err(self.failed("deleting volume"))?;
        }
        Ok(())
    }

    /// Defines the domain of `vm` (idempotent).
    pub async fn define(&self, vm: &VmRecord, token: Token) -> Result<pb::DomainStatus, Error> {
        let message = pb::DefineDomainRequest {
            spec: Some(spec_of(vm)),
            fence: fence(token),
        };
        Ok(self
            .client
            .clone()
            .define_domain(request(message, CALL_TIMEOUT))
            .await
            .map_err(self.failed("defining domain"))?
            .into_inner())
    }

    /// Starts the domain of `uuid`.
    pub async fn start(&self, uuid: &str, token: Token) -> Result<pb::DomainStatus, Error> {
        Ok(self
            .client
            .clone()
            .start_domain(request(command(uuid, token), CALL_TIMEOUT))
            .await
            .map_err(self.failed("starting domain"))?
            .into_inner())
    }

    /// Presses the ACPI power button of `uuid`.
    pub async fn shutdown(&self, uuid: &str, token: Token) -> Result<pb::DomainStatus, Error> {
        Ok(self
            .client
            .clone()
            .shutdown_domain(request(command(uuid, token), CALL_TIMEOUT))
            .await
            .map_err(self.failed("shutting down domain"))?
            .into_inner())
    }

    /// Powers `uuid` off.
    pub async fn destroy(&self, uuid: &str, token: Token) -> Result<pb::DomainStatus, Error> {
        Ok(self
            .client
            .clone()
            .destroy_domain(request(command(uuid, token), CALL_TIMEOUT))
            .await
            .map_err(self.failed("powering off domain"))?
            .into_inner())
    }

    /// Removes the definition of `uuid` (idempotent).
    pub async fn undefine(&self, uuid: &str, token: Token) -> Result<(), Error> {
        self.client
            .clone()
            .undefine_domain(request(command(uuid, token), CALL_TIMEOUT))
            .await
            .map_err(self.failed("undefining domain"))?;
        Ok(())
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
}

fn command(uuid: &str, token: Token) -> pb::DomainCommand {
    pb::DomainCommand {
        uuid: uuid.to_string(),
        fence: fence(token),
    }
}

fn volume_format(format: DiskFormat) -> pb::VolumeFormat {
    match format {
        DiskFormat::Raw => pb::VolumeFormat::Raw,
        DiskFormat::Qcow2 => pb::VolumeFormat::Qcow2,
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
            Boot::Iso { path } => pb::vm_spec::Boot::IsoPath(path.clone()),
        }),
    }
}
