//! FT end to end in the lab: an FT tiny guest is checkpointed to a standby on the peer; its
//! host loses power; the standby resumes the guest from the last committed checkpoint. What
//! an observer saw (the released serial output, the old host's then the new one's) counts on
//! with no gap and no repeat, under one boot id.

use proto::v1 as pb;
use tests::ha::{FAILOVER_TIMEOUT, SYNC_TIMEOUT, other, protected};
use tests::{COUNTER_PERIOD_TIMEOUT, Console, GUEST_BOOT_TIMEOUT, Lab, tiny_guest};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_death_resumes_the_ft_vm_on_the_peer_with_the_same_boot() {
    if tests::skip() {
        return;
    }
    let lab = Lab::up("pvft", 232);
    let mut api = lab.client().await;
    let vm = api
        .create_vm(pb::CreateVmRequest {
            mode: pb::ProtectionMode::Ft.into(),
            ..tiny_guest("f")
        })
        .await
        .unwrap()
        .into_inner();
    let console = Console::new(&lab, &vm);
    api.start_vm(pb::StartVmRequest { vm: "f".into() })
        .await
        .unwrap();
    console.wait_counters(1, GUEST_BOOT_TIMEOUT);
    let vm = lab.wait_vm("f", "protected", SYNC_TIMEOUT, protected).await;
    let node = vm.node.clone();
    console.wait_counters(3, COUNTER_PERIOD_TIMEOUT);

    lab.kill_host(&node);
    let moved = lab
        .wait_running_on("f", other(&node), FAILOVER_TIMEOUT)
        .await;
    // What the old host released, and all the new host's log holds (empty before the
    // failover: the standby prints nothing until it is resumed).
    let before = Console::from_start(&lab, &vm).counters();
    let again = Console::from_start(&lab, &moved).wait_counters(2, GUEST_BOOT_TIMEOUT);
    let boot = before[0].1.clone();
    let seen: Vec<(u64, String)> = before.iter().chain(&again).cloned().collect();
    assert!(
        seen.iter().all(|(_, b)| *b == boot),
        "the FT guest rebooted: an observer saw {seen:?}"
    );
    for pair in seen.windows(2) {
        assert_eq!(
            pair[1].0,
            pair[0].0 + 1,
            "an observer saw a gap or a repeat across the failover: {seen:?}"
        );
    }
    let survivor = lab.log(other(&node), "agent");
    assert!(
        survivor.contains("failover end: ok, the guest runs on from its checkpoint"),
        "the standby was not resumed"
    );
}
