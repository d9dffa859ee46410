//! The failover of an FT VM in a lab of its own (`pvbf`, subnets 10.236…): the primary's host
//! loses power (`pvctl lab kill-host`) while a client on the business network holds a TCP
//! connection to the guest's counter service. Everything an admin waits for is measured from
//! the power cut: the failover decided (host judged lost), the guest running on the peer
//! (fence and standby resume included), its first serial line there, and the client's first
//! answer from it over the same connection. Before the cut, the client's round trips while
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
    drop(client);
    Ok(json!({
        "tcp_rtt_ms_p50": rtt_p50,
        "failover_decided_ms": since_kill(failover.decided_unix_ms),
        "failover_resume_ms": since_kill(failover.running_unix_ms),
        "failover_to_output_ms": ms(to_output),
        "failover_to_tcp_answer_ms": ms(to_answer),
    }))
}

/// Polls `done` until it holds, for at most `timeout`.
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
