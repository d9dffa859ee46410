//! Controller and etcd failures in the lab: the serving controller's death hands the API to the
//! peer with every acknowledged change; the death of etcd's Raft leader fails no request and
//! moves no controller, also with a core kept busy.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use proto::v1 as pb;
use tests::{Lab, Spinner, TAKEOVER_TIMEOUT, tiny_guest, with_request_id};

/// A VM that is only created, changed and deleted: small, one 1 MiB disk.
fn request(name: &str, vcpus: u32) -> pb::CreateVmRequest {
    pb::CreateVmRequest {
        vcpus,
        memory_mib: 128,
        disks: vec![pb::DiskRequest {
            size_bytes: 1 << 20,
            ..tiny_guest(name).disks[0].clone()
        }],
        ..tiny_guest(name)
    }
}

/// name → (uuid, vcpus, state) of every VM.
async fn snapshot(api: &mut tests::Client) -> BTreeMap<String, (String, u32, i32)> {
    api.list_vms(pb::ListVmsRequest {})
        .await
        .unwrap()
        .into_inner()
        .vms
        .into_iter()
        .map(|vm| (vm.name.clone(), (vm.uuid, vm.vcpus, vm.state)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serving_controller_death_keeps_every_acknowledged_change() {
    if tests::skip() {
        return;
    }
    let lab = Lab::up("pvtf", 140);
    let mut api = lab.client().await;
    for i in 0..4 {
        api.create_vm(request(&format!("vm{i}"), 1)).await.unwrap();
    }
    api.modify_vm(pb::ModifyVmRequest {
        vm: "vm1".into(),
        vcpus: Some(2),
        ..Default::default()
    })
    .await
    .unwrap();
    api.delete_vm(pb::DeleteVmRequest { vm: "vm3".into() })
        .await
        .unwrap();
    let first = api
        .create_vm(with_request_id(request("retried", 1), RETRIED_ID))
        .await
        .unwrap()
        .into_inner();
    let acknowledged = snapshot(&mut api).await;

    let serving = lab.serving().await.unwrap();
    let survivor = if serving == "n0" { 1 } else { 0 };
    let survivor_api = format!("{}:7400", lab.node_address(survivor));
    lab.kill9(&format!("{serving}-controller"));
    let killed = Instant::now();
    let mut survivor_client = lab.client_at(&survivor_api).await.unwrap();
    let taken_over = loop {
        if let Ok(vms) = survivor_client.list_vms(pb::ListVmsRequest {}).await {
            break vms.into_inner();
        }
        assert!(
            killed.elapsed() < TAKEOVER_TIMEOUT,
            "no takeover within {TAKEOVER_TIMEOUT:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let takeover = killed.elapsed();
    eprintln!(
        "takeover after kill -9 of the serving controller: {:.2} s",
        takeover.as_secs_f64()
    );
    let after: BTreeMap<_, _> = taken_over
        .vms
        .into_iter()
        .map(|vm| (vm.name.clone(), (vm.uuid, vm.vcpus, vm.state)))
        .collect();
    let created = survivor_client
        .create_vm(request("after", 1))
        .await
        .unwrap()
        .into_inner();
    // A client that never saw its create's answer retries it, now at the new controller.
    let retried = survivor_client
        .create_vm(with_request_id(request("retried", 1), RETRIED_ID))
        .await
        .unwrap()
        .into_inner();
    let again = survivor_client
        .create_vm(request("retried", 1))
        .await
        .unwrap_err();

    assert_eq!(
        after, acknowledged,
        "the new serving controller lost or changed acknowledged state"
    );
    assert!(after.contains_key("vm0") && !after.contains_key("vm3"));
    assert_eq!(after["vm1"].1, 2);
    assert_eq!(created.state(), pb::VmState::Stopped);
    assert_eq!(
        retried.uuid, first.uuid,
        "a retried create made a second VM"
    );
    assert_eq!(again.code(), tonic::Code::AlreadyExists);
}

/// The request ID of the create retried across the takeover.
const RETRIED_ID: &str = "5e1d7a1c-0000-4000-8000-00000000beef";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_leader_death_fails_no_request_and_moves_no_controller() {
    if tests::skip() {
        return;
    }
    let lab = Lab::up("pvte", 150);
    let serving = lab.serving().await.unwrap();

    // Twice: on an idle machine, then with one core kept busy by a spinning process.
    let idle = writes_across_leader_death(&lab, "idle");
    lab.repair();
    let spinner = Spinner::start();
    let busy = writes_across_leader_death(&lab, "busy");
    drop(spinner);
    let still_serving = lab.serving().await.unwrap();
    let stepped_down: Vec<String> = ["n0", "n1"]
        .iter()
        .filter(|host| {
            let log = lab.log(host, "controller");
            log.contains("stepping down") || log.contains("step-down begin")
        })
        .map(|host| (*host).to_string())
        .collect();

    assert_eq!(idle, Vec::<String>::new(), "failed pvctl calls (idle)");
    assert_eq!(busy, Vec::<String>::new(), "failed pvctl calls (busy core)");
    assert_eq!(
        stepped_down,
        Vec::<String>::new(),
        "controllers that stepped down"
    );
    assert_eq!(
        still_serving, serving,
        "losing etcd's leader must not move the API"
    );
}

/// Runs 15 pvctl creates and 15 deletes back to back and kills etcd's Raft leader after the
/// fourth; returns the failed calls with their errors.
fn writes_across_leader_death(lab: &Lab, round: &str) -> Vec<String> {
    let mut failed = Vec::new();
    let mut slowest = Duration::ZERO;
    for i in 0..15 {
        if i == 2 {
            let leader = lab.etcd_leader();
            eprintln!("{round}: killing etcd's leader {leader}");
            lab.kill9(&leader);
        }
        let name = format!("{round}{i}");
        for args in [
            vec![
                "vm-create",
                &name,
                "--mode",
                "unprotected",
                "--disk",
                "1M",
                "--kernel-image",
                "tiny",
            ],
            vec!["vm-delete", &name],
        ] {
            let started = Instant::now();
            let output = lab.pvctl(&args);
            slowest = slowest.max(started.elapsed());
            if !output.status.success() {
                failed.push(format!(
                    "{}: {}",
                    args.join(" "),
                    String::from_utf8_lossy(&output.stderr).trim()
                ));
            }
        }
    }
    eprintln!(
        "{round}: slowest pvctl call across etcd's leader death: {:.2} s",
        slowest.as_secs_f64()
    );
    failed
}
