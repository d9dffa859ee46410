//! The bench's API calls: a connection to the first endpoint that answers, requests with a
//! timeout and a request ID, mutating calls retried the way pvctl retries them, the wait for
//! a healthy pair, and the VMs the bench creates.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use proto::v1 as pb;
use tests::{ApiAt, Lab};

use crate::{HEALTH_POLL, PAIR_RECOVERY_TIMEOUT, check_interrupted};

/// The controllers' API port.
pub(crate) const API_PORT: u16 = 7400;
/// One API call: a create commits in well under a second; an etcd re-election may hold a
/// call for a few seconds, and a slower attempt is retried with the same request ID.
pub(crate) const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
/// Every endpoint is on this machine: a live one accepts a connection at once.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// A logical request retried this long without success counts as failed.
const REQUEST_GIVE_UP: Duration = Duration::from_secs(60);
/// Pause between attempts of a retried request: short next to the gaps measured, long
/// enough not to busy-loop on the two cores the pair runs on.
const RETRY_PAUSE: Duration = Duration::from_millis(50);

pub(crate) type Client = tests::Client;

/// Mutating calls through a list of endpoints, each logical request with its own request ID
/// and retried (same ID) on UNAVAILABLE, a broken connection or an attempt's timeout, until
/// `give_up`; the connection is kept until an attempt fails.
#[derive(Debug)]
pub(crate) struct Retrying {
    api: ApiAt,
    client: Option<Client>,
    pub(crate) give_up: Duration,
    /// Attempts that failed and were retried, over all calls.
    pub(crate) retried: usize,
}

impl Retrying {
    pub(crate) fn new(api: ApiAt) -> Retrying {
        Retrying {
            api,
            client: None,
            give_up: REQUEST_GIVE_UP,
            retried: 0,
        }
    }

    pub(crate) async fn call<M, T, F, Fut>(&mut self, message: M, method: F) -> anyhow::Result<T>
    where
        M: Clone,
        F: Fn(Client, tonic::Request<M>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let id = uuid::Uuid::new_v4().to_string();
        let deadline = Instant::now() + self.give_up;
        loop {
            check_interrupted()?;
            let failure = match self.connected().await {
                Ok(client) => {
                    let request = with_id(message.clone(), &id, ATTEMPT_TIMEOUT)?;
                    match method(client, request).await {
                        Ok(response) => return Ok(response.into_inner()),
                        Err(status) if retryable(&status) => anyhow::Error::new(status),
                        Err(status) => return Err(status.into()),
                    }
                }
                Err(e) => e,
            };
            self.client = None;
            if Instant::now() + RETRY_PAUSE >= deadline {
                return Err(failure.context(format!("still failing after {:?}", self.give_up)));
            }
            self.retried += 1;
            tokio::time::sleep(RETRY_PAUSE).await;
        }
    }

    async fn connected(&mut self) -> anyhow::Result<Client> {
        if let Some(client) = &self.client {
            return Ok(client.clone());
        }
        let client = connect(&self.api).await?;
        self.client = Some(client.clone());
        Ok(client)
    }
}

/// Whether another attempt with the same request ID may succeed.
fn retryable(status: &tonic::Status) -> bool {
    match status.code() {
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded => true,
        // A connection reset mid-call surfaces as UNKNOWN with a transport error inside.
        tonic::Code::Unknown => status.message().contains("transport error"),
        _ => false,
    }
}

/// A client of the first of `api`'s endpoints that accepts a connection (each call's own
/// timeout bounds it; the endpoint's is a backstop).
pub(crate) async fn connect(api: &ApiAt) -> anyhow::Result<Client> {
    api.connect(CONNECT_TIMEOUT, Duration::from_secs(120))
        .await
        .map_err(|e| anyhow::anyhow!("no API endpoint answers: {e}"))
}

/// `message` with a timeout.
pub(crate) fn with_timeout<M>(message: M, timeout: Duration) -> tonic::Request<M> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(timeout);
    request
}

/// `message` with a timeout and the request ID `id`.
pub(crate) fn with_id<M>(
    message: M,
    id: &str,
    timeout: Duration,
) -> anyhow::Result<tonic::Request<M>> {
    let mut request = with_timeout(message, timeout);
    let value = id.parse().context("request ID as metadata")?;
    request
        .metadata_mut()
        .insert("x-pairvisor-request-id", value);
    Ok(request)
}

/// ListNodes through `api`.
async fn list_nodes(api: &ApiAt) -> anyhow::Result<Vec<pb::Node>> {
    let mut client = connect(api).await?;
    let request = with_timeout(pb::ListNodesRequest {}, ATTEMPT_TIMEOUT);
    Ok(client.list_nodes(request).await?.into_inner().nodes)
}

/// Waits until both nodes are UP with their agent and controller, one of them serving.
pub(crate) async fn wait_pair_healthy(api: &ApiAt, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        check_interrupted()?;
        let last = match list_nodes(api).await {
            Ok(nodes) if healthy(&nodes) => return Ok(()),
            Ok(nodes) => describe_nodes(&nodes),
            Err(e) => format!("{e:#}"),
        };
        if Instant::now() >= deadline {
            bail!("the pair was not healthy within {timeout:?}; last: {last}");
        }
        check_interrupted()?;
        tokio::time::sleep(HEALTH_POLL).await;
    }
}

/// Waits for a healthy pair, then returns the node that serves (`Lab::serving`).
pub(crate) async fn serving_when_healthy(lab: &Lab) -> anyhow::Result<String> {
    wait_pair_healthy(&lab.api(&lab.endpoints()), PAIR_RECOVERY_TIMEOUT).await?;
    lab.serving()
        .await
        .context("the pair was healthy, then no controller told which node serves")
}

fn healthy(nodes: &[pb::Node]) -> bool {
    let serving = nodes
        .iter()
        .filter(|n| n.role() == pb::NodeRole::Serving)
        .count();
    nodes.len() == 2
        && serving == 1
        && nodes
            .iter()
            .all(|n| n.state() == pb::NodeState::Up && n.agent_up && n.controller_up)
}

fn describe_nodes(nodes: &[pb::Node]) -> String {
    nodes
        .iter()
        .map(|n| {
            format!(
                "{} {:?} {:?} agent_up={} controller_up={} ({})",
                n.name,
                n.state(),
                n.role(),
                n.agent_up,
                n.controller_up,
                n.state_reason
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

pub(crate) async fn delete_vm(api: &mut Retrying, name: &str) -> anyhow::Result<()> {
    let message = pb::DeleteVmRequest { vm: name.into() };
    api.call(message, |mut c, r| async move { c.delete_vm(r).await })
        .await
        .with_context(|| format!("deleting {name}"))?;
    Ok(())
}

/// Powers the VM off unless it is stopped, then deletes it.
pub(crate) async fn remove_vm(api: &mut Retrying, name: &str) -> anyhow::Result<()> {
    let message = pb::GetVmRequest { vm: name.into() };
    let vm = api
        .call(message, |mut c, r| async move { c.get_vm(r).await })
        .await?;
    if vm.state() != pb::VmState::Stopped {
        let message = pb::PowerOffVmRequest { vm: name.into() };
        api.call(message, |mut c, r| async move { c.power_off_vm(r).await })
            .await
            .with_context(|| format!("powering {name} off"))?;
    }
    delete_vm(api, name).await
}

/// A VM that is only created and deleted: unprotected, 128 MiB, a 1 MiB disk.
pub(crate) fn small_vm(name: &str) -> pb::CreateVmRequest {
    let guest = tests::tiny_guest(name);
    pb::CreateVmRequest {
        memory_mib: 128,
        disks: vec![pb::DiskRequest {
            size_bytes: 1 << 20,
            ..guest.disks[0].clone()
        }],
        ..guest
    }
}
