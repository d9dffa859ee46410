//! A local disk fault under a protected HA VM: the disk holding the VM's volume on its host
//! dies (a loop device shrunk to nothing under the storage group's filesystem), and the guest
//! runs on from the peer's copy through the A-Links: no gap in its counter, no reboot, an
//! alert, and only the peer's copy counted current. Powered off and started again, the VM
//! starts on the peer from that copy with every write it acknowledged, including those made
//! after the fault.

use proto::v1 as pb;
use tests::disk::FailingDisk;
use tests::ha::{SYNC_TIMEOUT, assert_counts_on, other};
use tests::{COUNTER_PERIOD_TIMEOUT, Console, GUEST_BOOT_TIMEOUT, Lab};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_disk_failure_moves_the_guest_onto_the_peer_copy_without_a_gap() {
    if tests::skip() {
        return;
    }
    let lab = Lab::up("pvtd", 222);
    // Both hosts' storage on failing disks: the VM may be placed on either.
    let disks = [
        FailingDisk::mount(&lab, "n0"),
        FailingDisk::mount(&lab, "n1"),
    ];
    let vm = lab.start_protected("d", SYNC_TIMEOUT).await;
    let node = vm.node.clone();
    let peer = other(&node);
    let before = Console::new(&lab, &vm).wait_counters(2, COUNTER_PERIOD_TIMEOUT)[1].clone();

    // The disk under the running VM dies.
    disks[usize::from(node == "n1")].fail();

    let after = assert_counts_on(&lab, &vm, &before, 4);
    let simplex = lab
        .wait_vm("d", "simplex on the peer's copy", SYNC_TIMEOUT, |vm| {
            vm.protection
                .as_ref()
                .is_some_and(|p| p.state == "simplex" && p.current_on == [peer])
        })
        .await;
    assert_eq!(simplex.state(), pb::VmState::Running);
    assert_eq!(simplex.node, node, "the guest stays on its host");
    let reason = simplex.protection.unwrap().reason;
    assert!(
        reason.contains(&format!("disk on {node} failed")),
        "{reason}"
    );
    let alert = lab
        .wait_alert(&format!("ha/{}", vm.uuid), true, SYNC_TIMEOUT)
        .await;
    assert!(alert.contains("failed"), "{alert}");
    let agent_log = lab.log(&node, "agent");
    for line in agent_log.lines().filter(|l| l.contains("disk pivot")) {
        eprintln!("{node} agent: {line}");
    }
    assert!(
        agent_log.contains("disk pivot end: ok"),
        "no pivot in {node}'s agent log"
    );

    // The writes since the fault are on the peer's copy: powered off and started again, the
    // VM starts there (its home copy is behind) with every one of them.
    let console = Console::new(&lab, &vm);
    console.wait_counters(1, COUNTER_PERIOD_TIMEOUT);
    let mut api = lab.client().await;
    api.power_off_vm(pb::PowerOffVmRequest { vm: "d".into() })
        .await
        .unwrap();
    let last_printed = console.counters().last().cloned().unwrap();
    assert!(last_printed.0 > after.last().unwrap().0);
    let started = api
        .start_vm(pb::StartVmRequest { vm: "d".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        started.node, peer,
        "started on the host whose copy is behind"
    );
    let again = Console::new(&lab, &started).wait_counters(1, GUEST_BOOT_TIMEOUT);
    assert!(
        again[0].0 > last_printed.0,
        "acknowledged counter {} lost: resumed at {:?}",
        last_printed.0,
        again[0]
    );
}
