//! End to end on real QEMU (TCG) in the lab: a VM's whole life, an agent crash, and bad input.

use std::time::{Duration, Instant};

use proto::v1 as pb;
use tests::{COUNTER_PERIOD_TIMEOUT, Console, GUEST_BOOT_TIMEOUT, Lab, tiny_guest};

/// Time for the controller to notice a restarted agent (polls every second).
const AGENT_RECOVERY_TIMEOUT: Duration = Duration::from_secs(30);

/// The tiny guest in HA mode with a NIC on the business network.
fn create_request(name: &str) -> pb::CreateVmRequest {
    pb::CreateVmRequest {
        mode: pb::ProtectionMode::Ha.into(),
        networks: vec!["business".into()],
        ..tiny_guest(name)
    }
}

fn vm_ref(name: &str) -> String {
    name.to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vm_lifecycle_keeps_every_acknowledged_write() {
    if tests::skip() {
        return;
    }
    let lab = Lab::up("pvtl", 120);
    let mut api = lab.client().await;

    // Create: stopped, a volume on its node, nothing written yet.
    let vm = api
        .create_vm(create_request("life"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(vm.state(), pb::VmState::Stopped);
    assert!(lab.volume_path(&vm.node, &vm.disks[0].volume).is_file());

    // Start: the guest counts from 1 under one boot id, each line an acknowledged write.
    let console = Console::new(&lab, &vm);
    let started = Instant::now();
    let running = api
        .start_vm(pb::StartVmRequest { vm: vm_ref("life") })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(running.state(), pb::VmState::Running);
    console.wait_counters(1, GUEST_BOOT_TIMEOUT);
    eprintln!(
        "vm-start to first COUNTER line: {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let first = console.wait_counters(3, COUNTER_PERIOD_TIMEOUT);
    assert_eq!(first[0].0, 1);
    let boot1 = first[0].1.clone();
    assert!(first.iter().all(|(_, boot)| *boot == boot1));
    assert!(first.windows(2).all(|w| w[1].0 == w[0].0 + 1), "{first:?}");

    // The API console shows the same output (pvctl vm-console --until).
    let shown = lab.pvctl(&[
        "vm-console",
        "life",
        "--until",
        "COUNTER 3",
        "--timeout",
        "60",
    ]);
    assert!(
        shown.status.success(),
        "{}",
        String::from_utf8_lossy(&shown.stderr)
    );
    assert!(String::from_utf8_lossy(&shown.stdout).contains(&format!("COUNTER 3 boot={boot1}")));

    // Shutdown (ACPI): the guest powers itself off; the disk holds at least the last printed value.
    let stopped = api
        .shutdown_vm(pb::ShutdownVmRequest {
            vm: vm_ref("life"),
            grace_seconds: 60,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stopped.state(), pb::VmState::Stopped);
    assert_eq!(stopped.state_reason, "shut down by the guest on request");
    let last_printed = console.counters().last().cloned().unwrap();
    let (on_disk, disk_boot) = lab.disk_counter(&stopped).unwrap();
    assert!(
        on_disk >= last_printed.0,
        "disk {on_disk} < acknowledged {}",
        last_printed.0
    );
    assert_eq!(disk_boot, boot1);
    assert!(
        console
            .lines()
            .iter()
            .any(|l| l.starts_with("GUEST-SHUTDOWN"))
    );

    // Start again: a new boot resumes from the disk; nothing acknowledged is lost.
    let console = Console::new(&lab, &vm);
    api.start_vm(pb::StartVmRequest { vm: vm_ref("life") })
        .await
        .unwrap();
    let resumed = console.wait_line("GUEST-UP", GUEST_BOOT_TIMEOUT, |l| {
        l.starts_with("GUEST-UP")
    });
    assert!(resumed.ends_with(&format!("resume={on_disk}")), "{resumed}");
    let second = console.wait_counters(2, COUNTER_PERIOD_TIMEOUT);
    assert_eq!(second[0].0, on_disk + 1);
    let boot2 = second[0].1.clone();
    assert_ne!(boot2, boot1, "a restart is a new boot");

    // kill -9 the agent: the guest keeps running; the restarted agent reports it running.
    let node = vm.node.clone();
    lab.kill9(&format!("{node}-agent"));
    let during = Console::new(&lab, &vm);
    during.wait_counters(2, COUNTER_PERIOD_TIMEOUT);
    lab.repair();
    let deadline = Instant::now() + AGENT_RECOVERY_TIMEOUT;
    loop {
        let nodes = api
            .list_nodes(pb::ListNodesRequest {})
            .await
            .unwrap()
            .into_inner();
        let up = nodes
            .nodes
            .iter()
            .find(|n| n.name == node)
            .is_some_and(|n| n.state() == pb::NodeState::Up);
        if up {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "agent on {node} not back within {AGENT_RECOVERY_TIMEOUT:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let after = Console::new(&lab, &vm);
    let counted = after.wait_counters(2, COUNTER_PERIOD_TIMEOUT);
    assert!(
        counted.iter().all(|(_, boot)| *boot == boot2),
        "the guest rebooted: {counted:?}"
    );
    let info = api
        .get_vm(pb::GetVmRequest { vm: vm_ref("life") })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.state(), pb::VmState::Running);

    // Power off, then delete: the record and the volume are gone.
    let off = api
        .power_off_vm(pb::PowerOffVmRequest { vm: vm_ref("life") })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(off.state(), pb::VmState::Stopped);
    assert_eq!(off.state_reason, "powered off");
    api.delete_vm(pb::DeleteVmRequest { vm: vm_ref("life") })
        .await
        .unwrap();
    let missing = api
        .get_vm(pb::GetVmRequest { vm: vm_ref("life") })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);
    assert!(!lab.volume_path(&vm.node, &vm.disks[0].volume).exists());

    // The event log tells the same story, in order.
    let story = vm_story(&mut api, "life").await;
    assert_eq!(
        story,
        [
            "vm-created creating",
            "vm-changed stopped",
            "vm-changed starting",
            "vm-changed running",
            "vm-changed stopping",
            "vm-changed stopped",
            "vm-changed starting",
            "vm-changed running",
            "vm-changed stopping",
            "vm-changed stopped",
            "vm-changed deleting",
            "vm-deleted deleting",
        ]
    );
}

/// Time for the event log to replay from its first revision.
const EVENT_REPLAY_TIMEOUT: Duration = Duration::from_secs(10);

/// The events of VM `name` from the start of the log until it was deleted, as "kind state".
async fn vm_story(api: &mut tests::Client, name: &str) -> Vec<String> {
    let mut stream = api
        .watch_events(pb::WatchEventsRequest { since_revision: 1 })
        .await
        .unwrap()
        .into_inner();
    let mut story = Vec::new();
    let replay = async {
        while let Some(event) = stream.message().await.unwrap() {
            // The lifecycle's story; the HA protection's is told in ha.rs.
            if event.vm_name != name || event.kind() == pb::EventKind::VmProtection {
                continue;
            }
            let kind = match event.kind() {
                pb::EventKind::VmCreated => "vm-created",
                pb::EventKind::VmChanged => "vm-changed",
                pb::EventKind::VmDeleted => "vm-deleted",
                _ => "other",
            };
            let state = format!("{:?}", event.state()).to_lowercase();
            story.push(format!("{kind} {state}"));
            if event.kind() == pb::EventKind::VmDeleted {
                return;
            }
        }
    };
    let replayed = tokio::time::timeout(EVENT_REPLAY_TIMEOUT, replay).await;
    assert!(
        replayed.is_ok(),
        "no vm-deleted event for {name}; got {story:?}"
    );
    story
}

/// One bad request: what to send, the expected code, and a phrase the message must contain.
struct Bad {
    what: &'static str,
    request: pb::CreateVmRequest,
    code: tonic::Code,
    says: &'static str,
}

fn bad_creates() -> Vec<Bad> {
    let ok = || create_request("bad");
    vec![
        Bad {
            what: "name with a slash",
            request: pb::CreateVmRequest {
                name: "a/b".into(),
                ..ok()
            },
            code: tonic::Code::InvalidArgument,
            says: "name",
        },
        Bad {
            what: "empty name",
            request: pb::CreateVmRequest {
                name: String::new(),
                ..ok()
            },
            code: tonic::Code::InvalidArgument,
            says: "name",
        },
        Bad {
            what: "no mode",
            request: pb::CreateVmRequest { mode: 0, ..ok() },
            code: tonic::Code::InvalidArgument,
            says: "ft, ha or unprotected",
        },
        Bad {
            what: "21 vCPUs",
            request: pb::CreateVmRequest { vcpus: 21, ..ok() },
            code: tonic::Code::InvalidArgument,
            says: "1 to 20 vCPUs",
        },
        Bad {
            what: "257 GiB",
            request: pb::CreateVmRequest {
                memory_mib: 257 * 1024,
                ..ok()
            },
            code: tonic::Code::InvalidArgument,
            says: "256 GiB",
        },
        Bad {
            what: "13 disks",
            request: pb::CreateVmRequest {
                disks: vec![ok().disks[0].clone(); 13],
                ..ok()
            },
            code: tonic::Code::InvalidArgument,
            says: "1 to 12",
        },
        Bad {
            what: "21 networks",
            request: pb::CreateVmRequest {
                networks: vec!["business".into(); 21],
                ..ok()
            },
            code: tonic::Code::InvalidArgument,
            says: "at most 20",
        },
        Bad {
            what: "unknown storage group",
            request: pb::CreateVmRequest {
                disks: vec![pb::DiskRequest {
                    storage_group: "fast".into(),
                    ..ok().disks[0].clone()
                }],
                ..ok()
            },
            code: tonic::Code::InvalidArgument,
            says: "known on all nodes: sg0",
        },
        Bad {
            what: "unknown network",
            request: pb::CreateVmRequest {
                networks: vec!["dmz".into()],
                ..ok()
            },
            code: tonic::Code::InvalidArgument,
            says: "network \"dmz\"",
        },
        Bad {
            what: "unknown boot image",
            request: pb::CreateVmRequest {
                boot: Some(pb::create_vm_request::Boot::KernelImage("debian".into())),
                ..ok()
            },
            code: tonic::Code::InvalidArgument,
            says: "installed on all nodes: tiny",
        },
        Bad {
            what: "more memory than the pair has",
            request: pb::CreateVmRequest {
                memory_mib: 200 * 1024,
                ..ok()
            },
            code: tonic::Code::ResourceExhausted,
            says: "not enough memory",
        },
        Bad {
            what: "more vCPUs than the pair has",
            request: pb::CreateVmRequest {
                vcpus: 20,
                mode: pb::ProtectionMode::Ft.into(),
                ..ok()
            },
            code: tonic::Code::ResourceExhausted,
            says: "not enough vCPUs",
        },
        Bad {
            what: "a name in use",
            request: create_request("taken"),
            code: tonic::Code::AlreadyExists,
            says: "exists already",
        },
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_clear_errors_and_changes_nothing() {
    if tests::skip() {
        return;
    }
    let lab = Lab::up("pvtb", 130);
    let mut api = lab.client().await;
    api.create_vm(create_request("taken")).await.unwrap();
    let before = api
        .list_vms(pb::ListVmsRequest {})
        .await
        .unwrap()
        .into_inner();

    for bad in bad_creates() {
        let status = api.create_vm(bad.request).await.unwrap_err();
        assert_eq!(
            status.code(),
            bad.code,
            "{}: {}",
            bad.what,
            status.message()
        );
        assert!(
            status.message().contains(bad.says),
            "{}: {:?} lacks {:?}",
            bad.what,
            status.message(),
            bad.says
        );
    }
    let state_errors = [
        api.shutdown_vm(pb::ShutdownVmRequest {
            vm: "taken".into(),
            grace_seconds: 5,
        })
        .await
        .unwrap_err(),
        api.power_off_vm(pb::PowerOffVmRequest { vm: "taken".into() })
            .await
            .unwrap_err(),
        api.start_vm(pb::StartVmRequest { vm: "nope".into() })
            .await
            .unwrap_err(),
        api.shutdown_vm(pb::ShutdownVmRequest {
            vm: "taken".into(),
            grace_seconds: 4000,
        })
        .await
        .unwrap_err(),
    ];
    api.start_vm(pb::StartVmRequest { vm: "taken".into() })
        .await
        .unwrap();
    let modify_running = api
        .modify_vm(pb::ModifyVmRequest {
            vm: "taken".into(),
            vcpus: Some(2),
            ..Default::default()
        })
        .await
        .unwrap_err();
    let delete_running = api
        .delete_vm(pb::DeleteVmRequest { vm: "taken".into() })
        .await
        .unwrap_err();
    api.power_off_vm(pb::PowerOffVmRequest { vm: "taken".into() })
        .await
        .unwrap();
    let after = api
        .list_vms(pb::ListVmsRequest {})
        .await
        .unwrap()
        .into_inner();
    let cli = lab.pvctl(&[
        "vm-create",
        "x",
        "--mode",
        "ha",
        "--cpu",
        "21",
        "--disk",
        "16M",
        "--kernel-image",
        "tiny",
    ]);
    let cli_json = lab.pvctl(&["vm-info", "taken", "--json"]);

    assert_eq!(state_errors[0].code(), tonic::Code::FailedPrecondition);
    assert!(
        state_errors[0].message().contains("stopped already"),
        "{}",
        state_errors[0].message()
    );
    assert_eq!(state_errors[1].code(), tonic::Code::FailedPrecondition);
    assert_eq!(state_errors[2].code(), tonic::Code::NotFound);
    assert_eq!(state_errors[3].code(), tonic::Code::InvalidArgument);
    assert_eq!(modify_running.code(), tonic::Code::FailedPrecondition);
    assert!(
        modify_running
            .message()
            .contains("only while it is stopped"),
        "{}",
        modify_running.message()
    );
    assert_eq!(delete_running.code(), tonic::Code::FailedPrecondition);
    let settled = |vms: &pb::ListVmsResponse| {
        vms.vms
            .iter()
            .map(|vm| (vm.uuid.clone(), vm.vcpus, vm.mode, vm.state))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        settled(&after),
        settled(&before),
        "a refused request changed the pair's state"
    );
    assert_eq!(cli.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&cli.stderr).contains("1 to 20 vCPUs"));
    let parsed: serde_json::Value = serde_json::from_slice(&cli_json.stdout).unwrap();
    assert_eq!(parsed["name"], "taken");
    assert_eq!(parsed["state"], "stopped");
}
