//! The failover of an FT VM in a lab of its own (`pvbf`, subnets 10.236…): the primary's host
//! loses power (`pvctl lab kill-host`) while a client on the business network holds a TCP
//! connection to the guest's counter service. Everything an admin waits for is measured from
//! the power cut: the failover decided (host unreachable), the guest running on the peer
//! (standby resume included), its first serial line there, and the client's first answer
//! from it over the same connection. The survivor's controller serves for that cut; a second
//! cut, back the other way, kills the serving controller with the host
//! (`failover_resume_serving_lost_ms`: its controller lease must pass first). Before the cut, the client's round trips while
//! the VM is protected show what output commit costs a request-reply protocol
//! (`tcp_rtt_ms_p50`: the guest's own reply time under TCG included).

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use proto::v1 as pb;
use serde_json::{Value, json};
use tests::client::CounterClient;
use tests::ft_rig;
use tests::ha::{FAILOVER_TIMEOUT, SYNC_TIMEOUT, other};
use tests::{COUNTER_PERIOD_TIMEOUT, GUEST_BOOT_TIMEOUT, Lab, tiny_guest};

/// The bench VM's name.
const VM: &str = "bench";
/// How long the client's round trips are sampled before the power cut.
const RTT_WINDOW: Duration = Duration::from_secs(10);

/// Runs the failover and answers its figures (ms from the power cut).
pub async fn measure() -> anyhow::Result<Value> {
    let lab = Lab::up("pvbf", 236);
    let request = pb::CreateVmRequest {
        mode: pb::ProtectionMode::Ft.into(),
        networks: vec!["business".into()],
        ..tiny_guest(VM)
    };
    let vm = lab.start_protected_from(request, SYNC_TIMEOUT).await;
    let mac = &vm.nics.first().context("the VM has no NIC")?.mac;
    let guest = images::guest_ip(mac).with_context(|| format!("MAC {mac:?}"))?;
    let client = CounterClient::connect(&lab.client_ns(), guest, GUEST_BOOT_TIMEOUT);
    // Round trips while protected: a question's answer leaves the guest's host only once the
    // epoch it was written in commits.
    let asking = Instant::now();
    client.wait_above(0, asking, COUNTER_PERIOD_TIMEOUT);
    tokio::time::sleep(RTT_WINDOW).await;
    let mut rtts: Vec<f64> = client
        .answers()
        .iter()
        .filter(|a| a.asked >= asking)
        .map(|a| ms(a.at - a.asked))
        .collect();
    rtts.sort_by(f64::total_cmp);
    let rtt_p50 = rtts.get(rtts.len() / 2).copied();
    // First cut: the survivor's controller serves, so only the host's death is detected.
    serve_from(&lab, other(&vm.node)).await;
    let first = cut_power(&lab, &vm, &client).await?;
    // Second cut, back the other way: the serving controller dies with the host, so the pair
    // first waits for its controller lease to pass the API to the survivor.
    lab.restore_host(&vm.node);
    let vm = lab
        .wait_vm(VM, "protected again", SYNC_TIMEOUT, |v| {
            v.protection
                .as_ref()
                .is_some_and(|p| p.state == "protected")
        })
        .await;
    serve_from(&lab, &vm.node).await;
    let second = cut_power(&lab, &vm, &client).await?;
    drop(client);
    Ok(json!({
        "tcp_rtt_ms_p50": rtt_p50,
        "failover_decided_ms": first.decided,
        "failover_resume_ms": first.resume,
        "failover_to_output_ms": first.to_output,
        "failover_to_tcp_answer_ms": first.to_answer,
        "failover_resume_serving_lost_ms": second.resume,
    }))
}

/// What one power cut of the VM's host took, in ms from the cut.
struct Cut {
    decided: f64,
    resume: f64,
    to_output: f64,
    to_answer: f64,
}

/// Makes `node`'s controller the serving one (killing the other's, which the lab restarts).
async fn serve_from(lab: &Lab, node: &str) {
    if lab.serving().await.as_deref() != Some(node) {
        lab.kill9(&format!("{}-controller", other(node)));
        lab.wait_serving(node, FAILOVER_TIMEOUT).await;
        lab.repair();
    }
}

/// Cuts the power of `vm`'s host and waits for the guest on the peer: its first serial line
/// and the client's first answer over the connection it held.
async fn cut_power(lab: &Lab, vm: &pb::Vm, client: &CounterClient) -> anyhow::Result<Cut> {
    let peer = other(&vm.node);
    let peer_log = lab.serial_log(&pb::Vm {
        node: peer.to_string(),
        ..vm.clone()
    });
    let printed = ft_rig::counters(&peer_log).len();
    let seen = client
        .answers()
        .iter()
        .map(|a| a.counter)
        .max()
        .unwrap_or(0);

    let killed_unix_ms = unix_ms();
    let killed = Instant::now();
    lab.kill_host(&vm.node);
    wait_for(FAILOVER_TIMEOUT, || {
        ft_rig::counters(&peer_log).len() > printed
    })
    .await
    .context("no serial line from the peer")?;
    let to_output = killed.elapsed();
    wait_for(FAILOVER_TIMEOUT, || {
        client
            .answers()
            .iter()
            .any(|a| a.at > killed && a.counter > seen)
    })
    .await
    .context("no answer over the client's connection after the failover")?;
    let to_answer = client
        .answers()
        .iter()
        .find(|a| a.at > killed && a.counter > seen)
        .map_or(Duration::ZERO, |a| a.at - killed);
    let moved = lab.wait_running_on(VM, peer, FAILOVER_TIMEOUT).await;
    let failover = moved
        .protection
        .and_then(|p| p.last_failover)
        .context("no failover recorded")?;
    let since_kill = |unix_ms: i64| (unix_ms - killed_unix_ms) as f64;
    Ok(Cut {
        decided: since_kill(failover.decided_unix_ms),
        resume: since_kill(failover.running_unix_ms),
        to_output: ms(to_output),
        to_answer: ms(to_answer),
    })
}

async fn wait_for(timeout: Duration, done: impl Fn() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while !done() {
        if Instant::now() > deadline {
            bail!("not within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e4).round() / 10.0
}
