//! HA split-brain cases on real processes. A host cut off from everything (and its BMC out of
//! reach) stops its HA guest itself before its lease can expire, the peer restarts the VM from
//! its replica, and when the cut heals the old host never runs its old copy again. A host cut
//! off from its peer but not from the witness keeps its VM; the peer never starts it.

use std::time::Duration;

use proto::v1 as pb;
use tests::ha::{other, protected};
use tests::{COUNTER_PERIOD_TIMEOUT, Console, GUEST_BOOT_TIMEOUT, Lab};

/// The first full copy of the 16 MiB disk; generous for a loaded machine.
const SYNC_TIMEOUT: Duration = Duration::from_secs(120);
/// Lost detection, a fence that fails (its BMC is cut) and its fallback, a start and a boot.
const FAILOVER_TIMEOUT: Duration = Duration::from_secs(180);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_isolated_host_self_fences_and_never_resumes_its_old_copy() {
    if tests::skip() {
        return;
    }
    let lab = Lab::up("pvti", 216);
    let vm = lab.start_protected("i", SYNC_TIMEOUT).await;
    let node = vm.node.clone();
    let before = Console::new(&lab, &vm);
    let last = before.wait_counters(1, COUNTER_PERIOD_TIMEOUT)[0].clone();

    // Cut off from the peer and the witness, and its BMC out of reach: only the host itself
    // can stop its guest, and must before the pair restarts it elsewhere.
    lab.cut_bmc(&node);
    lab.isolate(&node, false);
    let moved = lab
        .wait_running_on("i", other(&node), FAILOVER_TIMEOUT)
        .await;
    let there = Console::new(&lab, &moved).wait_counters(1, GUEST_BOOT_TIMEOUT)[0].clone();
    let printed_on_old = before.counters().last().cloned().unwrap_or(last.clone());
    let agent_log = lab.log(&node, "agent");

    assert!(
        agent_log.contains("self-fence end: destroyed"),
        "{node}'s agent did not stop its guest"
    );
    assert!(
        there.0 > printed_on_old.0,
        "acknowledged counter {} lost: {there:?}",
        printed_on_old.0
    );

    // Healed: the old host rejoins and its old copy never runs again; the VM stays where it
    // went and is mirrored back.
    let old_console = Console::new(&lab, &vm);
    lab.heal();
    let back = lab
        .wait_vm("i", "protected again", FAILOVER_TIMEOUT, protected)
        .await;
    tokio::time::sleep(Duration::from_secs(3)).await;

    assert_eq!(back.node, other(&node));
    assert!(
        old_console.counters().is_empty(),
        "{node} ran its old copy after the heal: {:?}",
        old_console.lines()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_cut_off_from_its_peer_but_not_the_witness_keeps_its_vm() {
    if tests::skip() {
        return;
    }
    let lab = Lab::up("pvtw", 218);
    let vm = lab.start_protected("w", SYNC_TIMEOUT).await;
    let node = vm.node.clone();
    let console = Console::new(&lab, &vm);
    let first = console.wait_counters(1, COUNTER_PERIOD_TIMEOUT)[0].clone();

    // The peer loses every link, the witness included; the VM's host keeps quorum with it.
    lab.isolate(other(&node), false);
    let during = console.wait_counters(8, COUNTER_PERIOD_TIMEOUT * 8);
    let vm_then = lab
        .wait_vm("w", "running on its host", FAILOVER_TIMEOUT, |vm| {
            vm.state() == pb::VmState::Running
        })
        .await;
    lab.heal();
    lab.restore_host(other(&node));
    let back = lab
        .wait_vm("w", "protected again", FAILOVER_TIMEOUT, protected)
        .await;
    let peer_serial = lab.serial_log(&pb::Vm {
        node: other(&node).to_string(),
        ..vm.clone()
    });

    assert_eq!(
        (vm_then.node.as_str(), back.node.as_str()),
        (node.as_str(), node.as_str())
    );
    assert!(
        during.iter().all(|(_, boot)| *boot == first.1),
        "rebooted: {during:?}"
    );
    assert!(
        during.windows(2).all(|w| w[1].0 == w[0].0 + 1),
        "{during:?}"
    );
    assert!(
        !peer_serial.exists(),
        "{} ran the VM: {}",
        other(&node),
        peer_serial.display()
    );
}
