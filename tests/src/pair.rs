//! Fixture helpers for the pair's brain: who serves, the etcd Raft leader, direct agent calls
//! (to play a stale controller or make a domain outside the API), signals to daemons, the
//! daemons' logs, and a spinning process that keeps one core busy.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use proto::agent as agent_pb;
use proto::agent::agent_client::AgentClient;
use proto::v1 as pb;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::Lab;

/// Agent port in the lab.
const AGENT_PORT: u16 = 7701;
/// etcd client port in the lab.
const ETCD_PORT: u16 = 2379;
/// How long one poll of a lab API may take before it counts as "no answer".
const POLL_CALL_TIMEOUT: Duration = Duration::from_secs(3);

impl Lab {
    /// Management address of `node` ("n0", "n1" or "w").
    pub fn address_of(&self, node: &str) -> String {
        let index = match node {
            "n0" => 0,
            "n1" => 1,
            _ => 2,
        };
        self.node_address(index)
    }

    /// A client of `node`'s agent, with n0's controller's certificate (the agents admit
    /// only the controllers').
    pub async fn agent(&self, node: &str) -> AgentClient<Channel> {
        let endpoint = self.agent_endpoint(node, Some("n0-controller"));
        let channel = endpoint
            .connect()
            .await
            .unwrap_or_else(|e| panic!("agent at {}: {e}", endpoint.uri()));
        AgentClient::new(channel)
    }

    /// The endpoint of `node`'s agent over TLS, trusting the lab's CA, with the lab's
    /// certificate `identity` (`<lab>/pki/<identity>.pem|key`) if given.
    pub fn agent_endpoint(&self, node: &str, identity: Option<&str>) -> Endpoint {
        let pki = self.dir().join("pki");
        let read = |file: &str| {
            std::fs::read(pki.join(file))
                .unwrap_or_else(|e| panic!("reading the lab's {file}: {e}"))
        };
        let agents_ca = Certificate::from_pem(read("agents-ca.pem"));
        let mut tls = ClientTlsConfig::new().ca_certificate(agents_ca);
        if let Some(name) = identity {
            tls = tls.identity(Identity::from_pem(
                read(&format!("{name}.pem")),
                read(&format!("{name}.key")),
            ));
        }
        let address = format!("https://{}:{AGENT_PORT}", self.address_of(node));
        Endpoint::from_shared(address)
            .and_then(|e| e.tls_config(tls))
            .unwrap_or_else(|e| panic!("the endpoint of {node}'s agent: {e}"))
    }

    /// The node whose controller serves, asked through any controller that answers.
    pub async fn serving(&self) -> Option<String> {
        let mut api = self.client_at(&self.endpoints()).await.ok()?;
        let mut request = tonic::Request::new(pb::ListNodesRequest {});
        request.set_timeout(POLL_CALL_TIMEOUT);
        let nodes = api.list_nodes(request).await.ok()?.into_inner();
        nodes
            .nodes
            .into_iter()
            .find(|n| n.role() == pb::NodeRole::Serving)
            .map(|n| n.name)
    }

    /// The open alerts, asked through whichever controller answers now (a fresh connection each
    /// time: one pinned to an address a fault has cut would hang); `None` if none answers.
    pub async fn alerts(&self) -> Option<Vec<pb::Alert>> {
        let mut api = self.client_at(&self.endpoints()).await.ok()?;
        let mut request = tonic::Request::new(pb::ListAlertsRequest::default());
        request.set_timeout(POLL_CALL_TIMEOUT);
        Some(api.list_alerts(request).await.ok()?.into_inner().alerts)
    }

    /// Waits until alert `id` is open (`open`) or cleared; returns its message (empty once
    /// cleared).
    pub async fn wait_alert(&self, id: &str, open: bool, timeout: Duration) -> String {
        let started = Instant::now();
        loop {
            let found = self
                .alerts()
                .await
                .map(|alerts| alerts.into_iter().find(|a| a.id == id));
            match (found, open) {
                (Some(Some(alert)), true) => return alert.message,
                (Some(None), false) => return String::new(),
                _ => {}
            }
            assert!(
                started.elapsed() < timeout,
                "alert {id} not {} within {timeout:?}",
                if open { "raised" } else { "cleared" }
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The hosts whose management interface carries the system IP now.
    pub fn system_ip_holders(&self) -> Vec<String> {
        let address = format!(" 10.{}.0.10/", self.subnet);
        ["n0", "n1"]
            .iter()
            .filter(|host| {
                let ns = format!("{}-{host}", self.prefix);
                Command::new("ip")
                    .args(["-n", &ns, "-o", "addr", "show", "dev", "ibiz0"])
                    .output()
                    .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(&address))
            })
            .map(|host| (*host).to_string())
            .collect()
    }

    /// Waits until exactly `host` holds the system IP, or panics after `timeout`.
    pub async fn wait_system_ip_only_on(&self, host: &str, timeout: Duration) {
        let started = Instant::now();
        loop {
            let holders = self.system_ip_holders();
            if holders == [host] {
                return;
            }
            assert!(
                started.elapsed() < timeout,
                "the system IP is on {holders:?}, not only on {host}, after {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until node `name` is fenced (the survivor powered it off through its BMC): a
    /// host powered on again before that would be powered off by the pending fence.
    pub async fn wait_fenced(&self, name: &str, timeout: Duration) -> pb::Node {
        let started = Instant::now();
        loop {
            let node = self.node(name).await;
            if node.state() == pb::NodeState::Fenced {
                return node;
            }
            assert!(
                started.elapsed() < timeout,
                "node {name} not fenced within {timeout:?}; it is {:?}",
                node.state()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Node `name` as the serving controller describes it (health, daemons, paths).
    pub async fn node(&self, name: &str) -> pb::Node {
        let mut api = self.client().await;
        let nodes = api
            .list_nodes(pb::ListNodesRequest {})
            .await
            .unwrap_or_else(|e| panic!("listing nodes: {e}"))
            .into_inner();
        nodes
            .nodes
            .into_iter()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("no node {name}"))
    }

    /// The serving term as `node`'s agent has seen it.
    pub async fn agent_term(&self, node: &str) -> i64 {
        self.agent(node)
            .await
            .get_peer_health(agent_pb::GetPeerHealthRequest {})
            .await
            .unwrap_or_else(|e| panic!("peer health of {node}: {e}"))
            .into_inner()
            .term
    }

    /// The lab daemon name (`n0-etcd`, `n1-etcd`, `w-etcd`) of etcd's Raft leader.
    pub fn etcd_leader(&self) -> String {
        for host in ["n0", "n1", "w"] {
            let endpoint = format!("{}:{ETCD_PORT}", self.address_of(host));
            let output = Command::new("etcdctl")
                .env("ETCDCTL_API", "3")
                .args(["--endpoints", &endpoint, "endpoint", "status", "-w", "json"])
                .output()
                .unwrap_or_else(|e| panic!("running etcdctl: {e}"));
            let text = String::from_utf8_lossy(&output.stdout);
            // One member's own status: it leads when its member ID is the leader's.
            let id = json_number(&text, "\"member_id\":");
            let leader = json_number(&text, "\"leader\":");
            if id.is_some() && id == leader {
                return format!("{host}-etcd");
            }
        }
        panic!("no etcd member says it leads");
    }

    /// Sends `signal` to a lab daemon (e.g. `SIGSTOP` to `n0-controller`).
    pub fn signal(&self, daemon: &str, signal: i32) {
        let pid = self.pid(daemon);
        // SAFETY: kill(2) touches no memory of ours; `pid` comes from the lab's own PID file.
        #[allow(unsafe_code)]
        let rc = unsafe { libc::kill(pid, signal) };
        assert_eq!(rc, 0, "signal {signal} to {daemon} (PID {pid}) failed");
    }

    /// The log of a lab daemon, e.g. `log("n0", "controller")`.
    pub fn log(&self, host: &str, kind: &str) -> String {
        let path = self.dir.join(host).join("logs").join(format!("{kind}.log"));
        std::fs::read_to_string(&path).unwrap_or_default()
    }

    /// Waits until `node` serves (asked through any controller), or panics after `timeout`.
    pub async fn wait_serving(&self, node: &str, timeout: Duration) -> Duration {
        let started = Instant::now();
        loop {
            if self.serving().await.as_deref() == Some(node) {
                return started.elapsed();
            }
            assert!(
                started.elapsed() < timeout,
                "{node} did not serve within {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until VM `name` is in `state` (asked through any controller), returning it.
    pub async fn wait_vm_state(&self, name: &str, state: pb::VmState, timeout: Duration) -> pb::Vm {
        self.wait_vm(name, &format!("{state:?}"), timeout, |vm| {
            vm.state() == state
        })
        .await
    }

    /// Waits until VM `name` runs on `node`; returns it.
    pub async fn wait_running_on(&self, name: &str, node: &str, timeout: Duration) -> pb::Vm {
        let what = format!("running on {node}");
        self.wait_vm(name, &what, timeout, |vm| {
            vm.state() == pb::VmState::Running && vm.node == node
        })
        .await
    }

    /// Waits until VM `name` (asked through any controller) satisfies `done`, described by
    /// `what` in the failure message; returns it.
    pub async fn wait_vm(
        &self,
        name: &str,
        what: &str,
        timeout: Duration,
        done: impl Fn(&pb::Vm) -> bool,
    ) -> pb::Vm {
        let started = Instant::now();
        let mut last = String::from("no answer");
        loop {
            if let Ok(mut api) = self.client_at(&self.endpoints()).await {
                let mut request = tonic::Request::new(pb::GetVmRequest { vm: name.into() });
                request.set_timeout(POLL_CALL_TIMEOUT);
                match api.get_vm(request).await {
                    Ok(vm) if done(vm.get_ref()) => return vm.into_inner(),
                    Ok(vm) => {
                        let vm = vm.get_ref();
                        last = format!(
                            "{:?} ({}) on {}, protection {:?}",
                            vm.state(),
                            vm.state_reason,
                            vm.node,
                            vm.protection
                        );
                    }
                    Err(e) => last = e.to_string(),
                }
            }
            assert!(
                started.elapsed() < timeout,
                "VM {name} not {what} within {timeout:?}; last: {last}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// The first number after `key` in `text`.
fn json_number(text: &str, key: &str) -> Option<u64> {
    let rest = &text[text.find(key)? + key.len()..];
    let digits: String = rest
        .trim_start()
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// A process that keeps one CPU core busy until dropped (stopped by its PID).
#[derive(Debug)]
pub struct Spinner {
    child: Child,
}

impl Spinner {
    /// Starts spinning.
    pub fn start() -> Spinner {
        let child = Command::new("sh")
            .args(["-c", "while :; do :; done"])
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting a spinning process: {e}"));
        Spinner { child }
    }
}

impl Drop for Spinner {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_number_reads_member_id() {
        let text = r#"[{"Endpoint":"x","Status":{"header":{"member_id":1234,"raft_term":3},"leader":1234}}]"#;

        let id = json_number(text, "\"member_id\":");

        assert_eq!(id, Some(1234));
    }
}
