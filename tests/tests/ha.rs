//! HA on real processes: an HA VM's disk is mirrored over the A-Links to its peer, the VM
//! shows `protected`, and when its host loses power it restarts on the peer from the replica:
//! the counter it reads from its disk at boot is past the last one it printed before the cut
//! (every line printed is a write the guest saw acknowledged). The old host, powered back,
//! never runs its stale copy; the VM is mirrored back to it (only the writes made since the
//! failover, then a verify) and protected again. With one A-Link pulled nothing but an alert
//! happens; with both pulled the guest runs on alone, and the peer's copy, now behind, is
//! never started when the VM's host dies. When only its QEMU dies, it is restarted on its
//! host once, and moved to the peer the second time.

use std::time::{Duration, Instant};

use proto::v1 as pb;
use tests::ha::{FAILOVER_TIMEOUT, SYNC_TIMEOUT, assert_counts_on, other, protected};
use tests::{COUNTER_PERIOD_TIMEOUT, Console, GUEST_BOOT_TIMEOUT, Lab};

/// The API reports the guest's writes to its mirrored disk (its counter lands there) and
/// their time: the mirror's write latency.
async fn mirrored_writes_are_counted(lab: &Lab, vm: &str) {
    let mut api = lab.client().await;
    let deadline = Instant::now() + COUNTER_PERIOD_TIMEOUT;
    loop {
        let got = api
            .get_vm(pb::GetVmRequest { vm: vm.into() })
            .await
            .unwrap()
            .into_inner();
        let writes = got.protection.unwrap_or_default().disk_writes;
        if let Some(vda) = writes.iter().find(|w| w.device == "vda" && w.count > 0) {
            assert!(vda.total_seconds > 0.0, "{writes:?}");
            #[allow(clippy::cast_precision_loss, reason = "a test's counts")]
            let mean_ms = vda.total_seconds * 1000.0 / vda.count as f64;
            eprintln!(
                "mirrored writes on vda: {} writes, mean {mean_ms:.2} ms",
                vda.count
            );
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no write to the mirrored vda reported: {writes:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_death_restarts_the_ha_vm_on_the_peer_with_every_acknowledged_write() {
    if tests::skip() {
        return;
    }
    let lab = Lab::up("pvth", 210);
    // Protected: the mirror is in sync, both hosts hold a current copy.
    let vm = lab.start_protected("h", SYNC_TIMEOUT).await;
    let node = vm.node.clone();
    let protection = vm.protection.clone().unwrap();
    assert_eq!(protection.current_on, ["n0", "n1"]);
    let console = Console::new(&lab, &vm);
    console.wait_counters(3, COUNTER_PERIOD_TIMEOUT);
    mirrored_writes_are_counted(&lab, "h").await;

    // Power cut of its host: the VM restarts on the peer from the replica.
    let last_printed = console.counters().last().cloned().unwrap();
    let cut = Instant::now();
    lab.kill_host(&node);
    let moved = lab
        .wait_running_on("h", other(&node), FAILOVER_TIMEOUT)
        .await;
    let console = Console::new(&lab, &moved);
    let again = console.wait_counters(2, GUEST_BOOT_TIMEOUT);
    eprintln!(
        "VM h printed COUNTER {} on {} {:.2} s after the power cut of {node}",
        again[0].0,
        other(&node),
        cut.elapsed().as_secs_f64()
    );

    assert!(
        again[0].0 > last_printed.0,
        "acknowledged counter {} lost: resumed at {:?}",
        last_printed.0,
        again[0]
    );
    assert_ne!(
        again[0].1, last_printed.1,
        "a failover of an HA VM is a new boot"
    );
    let failover = moved
        .protection
        .as_ref()
        .and_then(|p| p.last_failover.clone())
        .unwrap();
    assert_eq!(
        (failover.from_node.as_str(), failover.to_node.as_str()),
        (node.as_str(), other(&node))
    );
    let fail_log = lab.log(other(&node), "controller") + &lab.log(&node, "controller");
    assert!(
        fail_log.contains("failover begin"),
        "no failover in the logs"
    );

    // The old host returns: its stale copy never runs; the VM is mirrored back to it.
    lab.restore_host(&node);
    let back = lab
        .wait_vm("h", "protected again", SYNC_TIMEOUT, protected)
        .await;
    let after = assert_counts_on(&lab, &back, again.last().unwrap(), 2);

    assert_eq!(back.node, other(&node));
    assert_eq!(back.protection.unwrap().current_on, ["n0", "n1"]);
    // The survivor tracked its writes from its start: only those crossed, then a verify.
    let survivor = lab.log(other(&node), "agent");
    assert!(
        survivor.contains("resync begin: incremental") && survivor.contains("verify end: equal"),
        "the returned host was not resynced incrementally and verified"
    );
    let old = lab.disk_counter(&pb::Vm {
        node: node.clone(),
        ..moved.clone()
    });
    assert!(
        old.as_ref()
            .is_some_and(|(n, boot)| *boot == after[0].1 && *n >= after[0].0),
        "the returned host's copy was not resynced from the survivor: {old:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_links_pulled_then_host_death_never_starts_the_copy_that_is_behind() {
    if tests::skip() {
        return;
    }
    let lab = Lab::up("pvtg", 212);
    let vm = lab.start_protected("g", SYNC_TIMEOUT).await;
    let node = vm.node.clone();
    let first = Console::new(&lab, &vm).wait_counters(1, COUNTER_PERIOD_TIMEOUT)[0].clone();

    // One A-Link pulled: the mirror carries on over the other; the guest never notices.
    lab.cut_path(&node, "alink1");
    let alert = lab
        .wait_alert(&format!("path/{node}/alink1"), true, SYNC_TIMEOUT)
        .await;
    assert!(alert.contains("alink1"), "{alert}");
    let one_cut = assert_counts_on(&lab, &vm, &first, 3);
    let still = lab.wait_vm("g", "protected", SYNC_TIMEOUT, protected).await;
    assert_eq!(still.protection.unwrap().current_on, ["n0", "n1"]);

    // Both pulled: the peer's copy falls behind, the guest runs on alone, simplex.
    lab.cut_path(&node, "alink2");
    let both_cut = assert_counts_on(&lab, &vm, one_cut.last().unwrap(), 3);
    let alone = lab
        .wait_vm("g", "simplex on its host alone", SYNC_TIMEOUT, |vm| {
            vm.protection
                .as_ref()
                .is_some_and(|p| p.state == "simplex" && p.current_on == [vm.node.clone()])
        })
        .await;
    assert_eq!(alone.node, node);
    let log = lab.log(&node, "agent");
    assert!(
        log.contains("stale mark end: recorded"),
        "no stale mark in the agent's log"
    );

    // The VM's host dies: its copy is the only current one, so the VM waits for it.
    let recent = Console::new(&lab, &vm);
    let last_printed = recent.wait_counters(1, COUNTER_PERIOD_TIMEOUT)[0].clone();
    assert!(last_printed.0 > both_cut[0].0);
    let console = Console::new(&lab, &vm);
    lab.kill_host(&node);
    let lost = lab
        .wait_vm_state("g", pb::VmState::Lost, FAILOVER_TIMEOUT)
        .await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let waited = lab
        .wait_vm("g", "still lost", FAILOVER_TIMEOUT, |_| true)
        .await;
    assert_eq!(
        (lost.node.as_str(), waited.node.as_str()),
        (node.as_str(), node.as_str())
    );
    assert_eq!(
        waited.state(),
        pb::VmState::Lost,
        "{:?}",
        waited.state_reason
    );

    // Its host returns: the VM runs there again with every acknowledged write, and the
    // mirror to the peer is rebuilt.
    lab.wait_fenced(&node, FAILOVER_TIMEOUT).await;
    lab.heal();
    lab.restore_host(&node);
    let back = lab
        .wait_vm("g", "protected again", FAILOVER_TIMEOUT, protected)
        .await;
    let again = console.wait_counters(1, GUEST_BOOT_TIMEOUT);

    assert_eq!(back.node, node);
    assert!(
        again[0].0 > last_printed.0,
        "acknowledged counter {} lost: {again:?}",
        last_printed.0
    );
}

/// Kills the QEMU of `vm`; returns the last counter it printed and its console from then on.
fn kill_qemu(lab: &Lab, vm: &pb::Vm) -> ((u64, String), Console) {
    let before = Console::new(lab, vm);
    before.wait_counters(1, COUNTER_PERIOD_TIMEOUT);
    lab.kill_qemu(vm);
    let last = before.counters().last().cloned().unwrap();
    (last, Console::new(lab, vm))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_qemu_is_restarted_on_its_host_once_then_moved_to_the_peer() {
    if tests::skip() {
        return;
    }
    let lab = Lab::up("pvtr", 214);
    let vm = lab.start_protected("r", SYNC_TIMEOUT).await;
    let node = vm.node.clone();

    // First death: restarted where it was, from its own disk.
    let (last, console) = kill_qemu(&lab, &vm);
    let here = console.wait_counters(1, GUEST_BOOT_TIMEOUT)[0].clone();
    let vm = lab
        .wait_vm("r", "protected again", SYNC_TIMEOUT, protected)
        .await;

    assert_eq!(vm.node, node);
    assert!(
        here.0 > last.0,
        "acknowledged counter {} lost: {here:?}",
        last.0
    );
    assert_ne!(here.1, last.1, "a restart is a new boot");

    // Second death: moved to the peer, from its replica.
    let (last, _) = kill_qemu(&lab, &vm);
    let moved = lab
        .wait_running_on("r", other(&node), FAILOVER_TIMEOUT)
        .await;
    let there = Console::new(&lab, &moved).wait_counters(1, GUEST_BOOT_TIMEOUT)[0].clone();

    assert!(
        there.0 > last.0,
        "acknowledged counter {} lost: {there:?}",
        last.0
    );
    let failover = moved.protection.and_then(|p| p.last_failover).unwrap();
    assert!(failover.reason.contains("QEMU died"), "{}", failover.reason);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_agent_takes_the_peer_copy_out_of_the_current_ones_until_it_returns() {
    if tests::skip() {
        return;
    }
    let lab = Lab::up("pvta", 226);
    let vm = lab.start_protected("a", SYNC_TIMEOUT).await;
    let node = vm.node.clone();
    let before = Console::new(&lab, &vm).wait_counters(1, COUNTER_PERIOD_TIMEOUT)[0].clone();

    // The agent dies; the guest runs on, and the mirror's path (in the agent) is gone: only
    // the VM's host holds a current copy, so a later loss of that host never fails it over.
    lab.kill9(&format!("{node}-agent"));
    let alone = lab
        .wait_vm("a", "simplex without its agent", FAILOVER_TIMEOUT, |vm| {
            vm.protection
                .as_ref()
                .is_some_and(|p| p.state == "simplex" && p.current_on == [vm.node.clone()])
        })
        .await;
    let reason = alone.protection.unwrap().reason;
    assert!(
        reason.contains(&format!("agent on {node} is down")),
        "{reason}"
    );
    let during = assert_counts_on(&lab, &vm, &before, 2);

    // The agent returns: the same QEMU is mirrored again and the VM is protected.
    lab.repair();
    let back = lab
        .wait_vm("a", "protected again", SYNC_TIMEOUT, protected)
        .await;
    assert_eq!(back.node, node);
    assert_eq!(back.protection.unwrap().current_on, ["n0", "n1"]);
    assert_counts_on(&lab, &vm, during.last().unwrap(), 2);
}
