//! End to end in the lab: the agent API admits only the controllers. `pvctl lab up` makes the
//! lab's certificates; an agent serves TLS and admits only a client certificate from the
//! controllers' CA. Plain HTTP/2, TLS without a client certificate and TLS with another
//! certificate of the lab (an agent's) are refused; a controller's certificate is admitted,
//! and the pair, which calls the agents that way, creates and starts a VM. The public API is
//! TLS only: plain HTTP/2 is refused, and pvctl trusts no other CA than the pair's.

use std::time::Duration;

use proto::agent as agent_pb;
use proto::agent::agent_client::AgentClient;
use proto::v1 as pb;
use proto::v1::pairvisor_client::PairvisorClient;
use tests::{Console, GUEST_BOOT_TIMEOUT, Lab, pvctl_ok, tiny_guest};
use tonic::transport::Endpoint;

/// Calls n0's agent's `GetHostFacts` over plain HTTP/2 (`tls` false) or over TLS with the
/// lab's certificate `identity`: the node that answered, or why none did.
async fn facts(lab: &Lab, tls: bool, identity: Option<&str>) -> Result<String, String> {
    let endpoint = if tls {
        lab.agent_endpoint("n0", identity)
    } else {
        Endpoint::from_shared(format!("http://{}:7701", lab.node_address(0)))
            .map_err(|e| e.to_string())?
    };
    let channel = endpoint
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(10))
        .connect()
        .await
        .map_err(|e| format!("{e:?}"))?;
    AgentClient::new(channel)
        .get_host_facts(agent_pb::GetHostFactsRequest {})
        .await
        .map(|r| r.into_inner().node)
        .map_err(|status| format!("{status:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_controllers_reach_the_agents_and_the_api_is_tls_only() {
    if tests::skip() {
        return;
    }
    let lab = Lab::up("pvsa", 238);
    let pki = lab.dir().join("pki");

    let plain = facts(&lab, false, None).await;
    let anonymous = facts(&lab, true, None).await;
    let agent_cert = facts(&lab, true, Some("n1-agent")).await;
    let controller = facts(&lab, true, Some("n1-controller")).await;

    for (case, outcome) in [
        ("plain HTTP/2", plain),
        ("TLS without a client certificate", anonymous),
        ("TLS with an agent's certificate", agent_cert),
    ] {
        match outcome {
            Err(why) => eprintln!("{case}: refused: {why}"),
            Ok(node) => panic!("{case} was admitted: agent {node} answered"),
        }
    }
    assert_eq!(controller, Ok("n0".to_string()));
    let key_mode = std::fs::metadata(pki.join("n0-controller.key"))
        .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o777)
        .unwrap();
    assert_eq!(key_mode, 0o600, "a private key is readable by others");

    // The public API is TLS only, and pvctl trusts only the pair's CA.
    let plain_api = Endpoint::from_shared(format!("http://{}:7400", lab.node_address(0)))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(10))
        .connect()
        .await;
    let answered = match plain_api {
        Ok(channel) => PairvisorClient::new(channel)
            .list_nodes(pb::ListNodesRequest {})
            .await
            .is_ok(),
        Err(_) => false,
    };
    assert!(!answered, "the public API answered plain HTTP/2");
    let other_ca = lab.pvctl_env(
        &["node-info"],
        &[("PVCTL_CA", &pki.join("controllers-ca.pem"))],
    );
    let refused = String::from_utf8_lossy(&other_ca.stderr);
    assert!(!other_ca.status.success(), "pvctl trusted another CA");
    assert!(refused.contains("--ca"), "{refused}");
    pvctl_ok(&lab.pvctl(&["node-info"]));

    // The controllers call the agents over it: a VM is created and boots.
    let mut api = lab.client().await;
    let vm = api.create_vm(tiny_guest("tls")).await.unwrap().into_inner();
    pvctl_ok(&lab.pvctl(&["vm-start", "tls"]));
    Console::new(&lab, &vm).wait_counters(1, GUEST_BOOT_TIMEOUT);
}
