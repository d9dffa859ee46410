//! The pair's brain on real processes: a dead or paused controller never touches a running
//! guest, a paused-then-resumed controller is fenced by the agents and steps down, a dead host
//! shows its VMs lost and restarts them when it returns, and a domain made outside the API is
//! reported, never adopted.

use std::time::{Duration, Instant};

use proto::agent as agent_pb;
use proto::v1 as pb;
use tests::ha::other;
use tests::{
    COUNTER_PERIOD_TIMEOUT, Console, GUEST_BOOT_TIMEOUT, Lab, TAKEOVER_TIMEOUT, tiny_guest,
};

/// Lost detection: host lease TTL (2 s), plus an etcd election when the dead host held etcd's
/// leader (a new leader extends every lease), plus a takeover when it held the serving
/// controller; generous for a loaded machine.
const LOST_TIMEOUT: Duration = Duration::from_secs(60);
/// A restored host: etcd, agent and controller start, heartbeats resume, the VM is started
/// again and boots.
const RETURN_TIMEOUT: Duration = Duration::from_secs(120);
/// The serving controller polls domains every second and writes an alert at once.
const ALERT_TIMEOUT: Duration = Duration::from_secs(30);
/// A UUID no VM of the pair has: the domain "made outside the API".
const OUTSIDER: &str = "0badd0e5-5eed-4000-8000-000000000001";

/// Starts VM `name` and waits for its first counters; returns the VM and them.
async fn run_guest(lab: &Lab, name: &str) -> (pb::Vm, Vec<(u64, String)>) {
    let mut api = lab.client().await;
    let vm = api.create_vm(tiny_guest(name)).await.unwrap().into_inner();
    let console = Console::new(lab, &vm);
    api.start_vm(pb::StartVmRequest { vm: name.into() })
        .await
        .unwrap();
    console.wait_counters(1, GUEST_BOOT_TIMEOUT);
    let counters = console.wait_counters(3, COUNTER_PERIOD_TIMEOUT);
    (vm, counters)
}

/// Asserts that new counter lines follow `before` one by one under the same boot.
fn assert_guest_ran_on(console: &Console, before: &(u64, String)) {
    let after = console.wait_counters(3, COUNTER_PERIOD_TIMEOUT);
    assert!(
        after.iter().all(|(_, boot)| *boot == before.1),
        "the guest rebooted: {after:?} after {before:?}"
    );
    assert!(after[0].0 > before.0, "{after:?} after {before:?}");
    assert!(after.windows(2).all(|w| w[1].0 == w[0].0 + 1), "{after:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_death_and_pause_never_touch_the_guest() {
    if tests::skip() {
        return;
    }
    let lab = Lab::up("pvtc", 170);
    let (vm, first) = run_guest(&lab, "g").await;
    let mut last = first.last().cloned().unwrap();

    // kill -9 the serving controller: the other serves, the guest runs on untouched.
    let serving = lab.serving().await.unwrap();
    let console = Console::new(&lab, &vm);
    lab.kill9(&format!("{serving}-controller"));
    let took = lab.wait_serving(other(&serving), TAKEOVER_TIMEOUT).await;
    eprintln!(
        "{} serves {:.2} s after kill -9 of {serving}'s controller",
        other(&serving),
        took.as_secs_f64()
    );
    assert_guest_ran_on(&console, &last);
    // The dead controller could not drop the system IP; its host's agent does.
    lab.wait_system_ip_only_on(other(&serving), TAKEOVER_TIMEOUT)
        .await;

    // ... and the guest is fully manageable while that controller stays dead.
    let mut api = lab.client().await;
    let stopped = api
        .shutdown_vm(pb::ShutdownVmRequest {
            vm: "g".into(),
            grace_seconds: 60,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stopped.state(), pb::VmState::Stopped);
    assert_eq!(stopped.state_reason, "shut down by the guest on request");
    let dead = lab.node(&serving).await;
    assert!(!dead.controller_up && dead.agent_up);
    assert_eq!(dead.state(), pb::NodeState::Up);

    // SIGSTOP the serving controller until the other serves, then SIGCONT it.
    lab.repair();
    let console = Console::new(&lab, &vm);
    api.start_vm(pb::StartVmRequest { vm: "g".into() })
        .await
        .unwrap();
    console.wait_counters(1, GUEST_BOOT_TIMEOUT);
    last = console.wait_counters(2, COUNTER_PERIOD_TIMEOUT)[1].clone();
    let paused = lab.serving().await.unwrap();
    let old_term = lab.agent_term(&vm.node).await;
    let console = Console::new(&lab, &vm);
    lab.signal(&format!("{paused}-controller"), libc::SIGSTOP);
    lab.wait_serving(other(&paused), TAKEOVER_TIMEOUT).await;
    let new_term = lab.agent_term(&vm.node).await;
    // What the paused controller would send: a command under its old term.
    let stale = lab
        .agent(&vm.node)
        .await
        .destroy_domain(agent_pb::DomainCommand {
            uuid: vm.uuid.clone(),
            fence: Some(agent_pb::Fence {
                term: old_term,
                generation: u64::MAX,
            }),
            track_writes: false,
            resume_standby: false,
        })
        .await
        .unwrap_err();
    lab.signal(&format!("{paused}-controller"), libc::SIGCONT);
    let resumed = Instant::now();
    while !lab.log(&paused, "controller").contains("stepping down")
        && !lab.log(&paused, "controller").contains("step-down begin")
    {
        assert!(
            resumed.elapsed() < TAKEOVER_TIMEOUT,
            "the resumed controller on {paused} did not step down"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    assert!(new_term > old_term, "terms {old_term} then {new_term}");
    assert_eq!(stale.code(), tonic::Code::Aborted);
    assert!(
        stale.message().contains(&format!("stale term {old_term}")),
        "{}",
        stale.message()
    );
    assert_eq!(lab.serving().await.as_deref(), Some(other(&paused)));
    assert_guest_ran_on(&console, &last);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_death_loses_the_vm_and_its_return_restarts_it() {
    if tests::skip() {
        return;
    }
    let lab = Lab::up("pvtk", 190);
    let (vm, counters) = run_guest(&lab, "u").await;
    let node = vm.node.clone();

    // A domain started outside the API is reported and not adopted.
    outsider_is_reported_not_adopted(&lab, &node).await;

    // One heartbeat path cut: an alert naming it, nothing else; healed: cleared.
    lab.cut_path(&node, "alink1");
    let silent = lab
        .wait_alert(&format!("path/{node}/alink1"), true, ALERT_TIMEOUT)
        .await;
    assert!(silent.contains("alink1"), "{silent}");
    lab.heal();
    lab.wait_alert(&format!("path/{node}/alink1"), false, ALERT_TIMEOUT)
        .await;

    // Cut off from the peer on every path but still holding quorum through the witness: a
    // partition, nothing is taken over, the guest runs on.
    let console = Console::new(&lab, &vm);
    let serving = lab.serving().await.unwrap();
    // The serving controller judges the host on the other side of the cut.
    let judged = if serving == node {
        other(&node)
    } else {
        node.as_str()
    };
    lab.isolate(&node, true);
    let partitioned = lab
        .wait_alert(&format!("host/{judged}"), true, ALERT_TIMEOUT)
        .await;
    let during = console.wait_counters(3, COUNTER_PERIOD_TIMEOUT);
    let state = lab
        .wait_vm_state("u", pb::VmState::Running, ALERT_TIMEOUT)
        .await;
    lab.heal();
    lab.wait_alert(&format!("host/{judged}"), false, ALERT_TIMEOUT)
        .await;
    assert!(partitioned.contains("partitioned"), "{partitioned}");
    assert_eq!(state.state(), pb::VmState::Running);
    assert!(during.iter().all(|(_, boot)| *boot == counters[0].1));

    // Power cut: the VM shows lost, its host lost.
    let console = Console::new(&lab, &vm);
    let last_printed = console
        .counters()
        .last()
        .cloned()
        .unwrap_or_else(|| counters.last().cloned().unwrap());
    let cut = Instant::now();
    lab.kill_host(&node);
    let lost = lab
        .wait_vm_state("u", pb::VmState::Lost, LOST_TIMEOUT)
        .await;
    eprintln!(
        "VM u lost {:.2} s after the power cut of {node}",
        cut.elapsed().as_secs_f64()
    );
    assert_eq!(lost.state_reason, format!("host {node} down"));
    let host = lab.node(&node).await;
    assert!(
        matches!(host.state(), pb::NodeState::Lost | pb::NodeState::Fenced),
        "{:?}",
        host.state()
    );
    lab.wait_fenced(&node, LOST_TIMEOUT).await;

    // Power back: the VM starts again where it was and resumes its counter from its disk.
    let console = Console::new(&lab, &vm);
    lab.restore_host(&node);
    lab.wait_vm_state("u", pb::VmState::Running, RETURN_TIMEOUT)
        .await;
    let again = console.wait_counters(2, GUEST_BOOT_TIMEOUT);

    assert!(
        again[0].0 > last_printed.0,
        "acknowledged counter {} lost: resumed at {:?}",
        last_printed.0,
        again[0]
    );
    assert_ne!(again[0].1, last_printed.1, "a power cut is a new boot");
    assert_eq!(again[1].0, again[0].0 + 1);
}

/// Defines and starts a domain on `node` through the agent (as someone bypassing the API
/// would), waits for the pair to alert about it, checks it was not adopted, then removes it
/// and waits for the alert to clear.
async fn outsider_is_reported_not_adopted(lab: &Lab, node: &str) {
    let term = lab.agent_term(node).await;
    let fence = Some(agent_pb::Fence {
        term,
        generation: 1,
    });
    let mut agent = lab.agent(node).await;
    let spec = agent_pb::VmSpec {
        uuid: OUTSIDER.into(),
        name: "outsider".into(),
        vcpus: 1,
        memory_mib: 128,
        disks: vec![],
        nics: vec![],
        boot: Some(agent_pb::vm_spec::Boot::KernelImage("tiny".into())),
        self_fence: false,
        ft: false,
    };
    agent
        .define_domain(agent_pb::DefineDomainRequest {
            spec: Some(spec),
            fence,
        })
        .await
        .unwrap();
    let command = agent_pb::DomainCommand {
        uuid: OUTSIDER.into(),
        fence,
        track_writes: false,
        resume_standby: false,
    };
    agent.start_domain(command.clone()).await.unwrap();
    let id = format!("domain/unknown/{node}/{OUTSIDER}");
    let raised = lab.wait_alert(&id, true, ALERT_TIMEOUT).await;
    let mut api = lab.client().await;
    let vms = api
        .list_vms(pb::ListVmsRequest {})
        .await
        .unwrap()
        .into_inner()
        .vms;
    agent.destroy_domain(command.clone()).await.unwrap();
    agent.undefine_domain(command).await.unwrap();
    lab.wait_alert(&id, false, ALERT_TIMEOUT).await;

    assert!(raised.contains("not adopted"), "{raised}");
    assert!(
        vms.iter()
            .all(|v| v.uuid != OUTSIDER && v.name != "outsider")
    );
}
