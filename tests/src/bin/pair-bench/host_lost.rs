//! Measurement 3, `host_lost_detect_ms`: `lab kill-host` the non-serving node while a task
//! polls ListNodes on the serving controller every [`LOST_POLL`]; the time from the start of
//! the kill to the node's state LOST (or FENCED). Then `lab restore-host` and a wait for a
//! healthy pair.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use proto::v1 as pb;
use tests::Lab;
use tokio::runtime::Runtime;

use crate::api::{API_PORT, Client, connect, serving_when_healthy, wait_pair_healthy};
use crate::stats::millis;
use crate::{PAIR_RECOVERY_TIMEOUT, check_interrupted};

/// How often the host-lost poll asks the serving controller (the 50 ms).
pub(crate) const LOST_POLL: Duration = Duration::from_millis(50);
/// One ListNodes poll: a read from the engine's snapshot; a slower answer is a missed poll.
const POLL_CALL_TIMEOUT: Duration = Duration::from_secs(1);
/// Fifteen times the host-lost target: a slower detection is a failure, not a number.
const LOST_GIVE_UP: Duration = Duration::from_secs(30);

/// Every host-lost round.
#[derive(Debug, Default)]
pub(crate) struct HostLost {
    /// From the start of `kill-host` to LOST, ms.
    pub(crate) samples: Vec<f64>,
    /// The killed host of each round.
    pub(crate) hosts: Vec<String>,
    /// The state seen (LOST, or FENCED if the poll missed LOST).
    pub(crate) states: Vec<String>,
    /// etcd's Raft leader before the kill: a leader dying with its host adds an election.
    pub(crate) etcd_leaders: Vec<String>,
    /// How long `pvctl lab kill-host` itself took, ms.
    pub(crate) kill_command_ms: Vec<f64>,
    /// From `restore-host` to a healthy pair, ms.
    pub(crate) back_up_ms: Vec<f64>,
}

/// One round: kill the non-serving host, time its detection, restore it; adds to `rounds`.
pub(crate) fn round(runtime: &Runtime, lab: &Lab, rounds: &mut HostLost) -> anyhow::Result<()> {
    let endpoints = lab.api(&lab.endpoints());
    let serving = runtime.block_on(serving_when_healthy(lab))?;
    let victim = if serving == "n0" { "n1" } else { "n0" };
    let serving_api = format!("{}:{API_PORT}", lab.address_of(&serving));
    let client = runtime.block_on(connect(&lab.api(&serving_api)))?;
    let etcd_leader = lab.etcd_leader();
    let started = Instant::now();
    let poll = runtime.spawn({
        let victim = victim.to_string();
        async move { poll_until_lost(&client, &victim, started).await }
    });
    lab.kill_host(victim);
    let kill_command = started.elapsed();
    let (ms, state) = runtime.block_on(poll).context("the poll panicked")??;
    eprintln!(
        "host lost: killed {victim} ({:.0} ms for kill-host, etcd leader {etcd_leader}), {serving} saw it {state} after {ms:.0} ms",
        millis(kill_command)
    );
    let restored = Instant::now();
    lab.restore_host(victim);
    runtime.block_on(wait_pair_healthy(&endpoints, PAIR_RECOVERY_TIMEOUT))?;
    rounds.samples.push(ms);
    rounds.hosts.push(victim.to_string());
    rounds.states.push(state);
    rounds.etcd_leaders.push(etcd_leader);
    rounds.kill_command_ms.push(millis(kill_command));
    rounds.back_up_ms.push(millis(restored.elapsed()));
    Ok(())
}

/// Polls ListNodes on `client` until `host` is LOST (or FENCED); returns the ms since
/// `started` and the state's name.
async fn poll_until_lost(
    client: &Client,
    host: &str,
    started: Instant,
) -> anyhow::Result<(f64, String)> {
    let mut last = String::from("no answer");
    while started.elapsed() < LOST_GIVE_UP {
        check_interrupted()?;
        let mut request = tonic::Request::new(pb::ListNodesRequest {});
        request.set_timeout(POLL_CALL_TIMEOUT);
        match client.clone().list_nodes(request).await {
            Ok(nodes) => {
                let node = nodes
                    .into_inner()
                    .nodes
                    .into_iter()
                    .find(|n| n.name == host);
                if let Some(node) = node {
                    let state = node.state();
                    if matches!(state, pb::NodeState::Lost | pb::NodeState::Fenced) {
                        return Ok((millis(started.elapsed()), format!("{state:?}")));
                    }
                    last = format!("{state:?} ({})", node.state_reason);
                }
            }
            Err(status) => last = format!("{:?}: {}", status.code(), status.message()),
        }
        tokio::time::sleep(LOST_POLL).await;
    }
    bail!("{host} not LOST within {LOST_GIVE_UP:?}; last: {last}")
}
