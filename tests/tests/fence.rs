//! Fencing on real processes: each lab host has a simulated BMC (`ipmi_sim` in a namespace of
//! its own on the management network, whose power-off kills every process of its host).
//!
//! 1. An HA VM's host loses power: the survivor's controller powers it off through its BMC
//!    and logs the fence before the failover; the host shows `fenced`; the VM restarts on the
//!    survivor with every acknowledged write.
//! 2. The host returns and the VM is protected again. Then the BMC of the VM's (new) host is
//!    cut before that host loses power: the fence fails (the BMC does not answer), and the VM
//!    still fails over, once the host's lease expired plus its self-fence margin.

use std::time::{Duration, Instant};

use proto::v1 as pb;
use tests::ha::{other, protected};
use tests::{COUNTER_PERIOD_TIMEOUT, Console, GUEST_BOOT_TIMEOUT, Lab};

/// The first full copy of the 16 MiB disk over the A-Links (and the copy back to a host that
/// returned), generous for a loaded machine.
const SYNC_TIMEOUT: Duration = Duration::from_secs(180);
/// Lost detection (host lease 2 s, longer when the dead host held etcd's leader or served),
/// n1's fence delay (1 s), the fence or its failure (an unreachable BMC: about 6 s), the
/// start on the survivor and a boot under TCG, on a busy machine.
const FAILOVER_TIMEOUT: Duration = Duration::from_secs(180);
/// The HA VM.
const VM: &str = "f";

/// Where each of `lines` first appears in `log`, panicking with the log if one is missing.
fn positions(log: &str, lines: &[&str]) -> Vec<usize> {
    lines
        .iter()
        .map(|line| {
            log.find(line)
                .unwrap_or_else(|| panic!("no {line:?} in the controller log:\n{log}"))
        })
        .collect()
}

/// The `took_ms` of the fence's end line, for the report.
fn fence_ms(log: &str) -> Option<u64> {
    let line = log.lines().find(|l| l.contains("fence end:"))?;
    let rest = &line[line.find("took_ms=")? + "took_ms=".len()..];
    rest.split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// Cuts the power of the VM's host (after `before`, e.g. cutting its BMC) and waits until the
/// VM runs on the other host with a counter past the last one it printed. Returns the
/// survivor's controller log written since the cut.
async fn lose_host_and_fail_over(lab: &Lab, console: &Console, node: &str) -> (String, pb::Vm) {
    let survivor = other(node);
    let mark = lab.log(survivor, "controller").len();
    let last_printed = console.counters().last().cloned().unwrap();
    let cut = Instant::now();
    lab.kill_host(node);
    let moved = lab.wait_running_on(VM, survivor, FAILOVER_TIMEOUT).await;
    let running = cut.elapsed();
    let again = Console::new(lab, &moved).wait_counters(1, GUEST_BOOT_TIMEOUT);
    let log = lab.log(survivor, "controller")[mark..].to_string();
    eprintln!(
        "power cut of {node}: VM {VM} running on {survivor} after {:.2} s, COUNTER {} after {:.2} s; fence took {:?} ms",
        running.as_secs_f64(),
        again[0].0,
        cut.elapsed().as_secs_f64(),
        fence_ms(&log)
    );
    assert!(
        again[0].0 > last_printed.0,
        "acknowledged counter {} lost: resumed at {:?}",
        last_printed.0,
        again[0]
    );
    (log, moved)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_host_is_fenced_before_failover_or_waited_out_when_its_bmc_is_cut() {
    if tests::skip() {
        return;
    }
    let lab = Lab::up("pvtq", 220);
    let vm = lab.start_protected(VM, SYNC_TIMEOUT).await;
    let console = Console::new(&lab, &vm);
    console.wait_counters(2, COUNTER_PERIOD_TIMEOUT);

    // 1. The BMC answers: fenced, then failed over.
    let node = vm.node.clone();
    let (log, moved) = lose_host_and_fail_over(&lab, &console, &node).await;

    let order = positions(&log, &["fence begin", "fence end: ok", "failover begin"]);
    assert!(
        order.is_sorted(),
        "fence not logged before the failover:\n{log}"
    );
    assert_eq!(lab.node(&node).await.state(), pb::NodeState::Fenced);

    // The host returns; the VM is mirrored back to it.
    lab.restore_host(&node);
    let vm = lab
        .wait_vm(VM, "protected again", SYNC_TIMEOUT, protected)
        .await;
    let console = Console::new(&lab, &moved);
    console.wait_counters(2, COUNTER_PERIOD_TIMEOUT);

    // 2. The BMC of the VM's host does not answer: the lease and self-fence margin fallback.
    let node = vm.node.clone();
    lab.cut_bmc(&node);
    let (log, _) = lose_host_and_fail_over(&lab, &console, &node).await;

    let order = positions(
        &log,
        &[
            "fence begin",
            "fence end: failed; the BMC did not answer",
            "fence fallback",
            "failover begin",
        ],
    );
    assert!(
        order.is_sorted(),
        "fallback not before the failover:\n{log}"
    );
    assert_eq!(lab.node(&node).await.state(), pb::NodeState::Lost);
    lab.heal();
}
