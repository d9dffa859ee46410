//! The real `pv-agent` binary on loopback with its own embed root: volumes, domain definition
//! and bad input over gRPC. No guest is started here (that is the end-to-end tests' job).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use proto::agent as pb;
use proto::agent::agent_client::AgentClient;
use tonic::transport::Channel;

mod process;

use process::{Reaped, free_port};

/// The first connection to a fresh embed root may wait for QEMU's capability probe.
const AGENT_READY_TIMEOUT: Duration = Duration::from_secs(60);
const UUID: &str = "0b7e7a52-8a7e-4f0e-9c1e-2f4c7b3d9a01";

struct Agent {
    _child: Reaped,
    client: AgentClient<Channel>,
    /// Its node name, unique to this agent: the tests check they talk to theirs.
    node: String,
    /// Its log, for failure messages.
    log: PathBuf,
    _dir: tempfile::TempDir,
}

fn write_fake_image(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    for (file, text) in [
        ("vmlinuz", "k"),
        ("initrd.cpio.gz", "i"),
        ("cmdline", "console=ttyS0"),
    ] {
        std::fs::write(dir.join(file), text).unwrap();
    }
}

/// The agent's log, for a failure message.
fn log_of(log: &Path) -> String {
    std::fs::read_to_string(log).unwrap_or_default()
}

/// A `pv-agent` of this test's own. A free port can be taken again before the agent binds it
/// (the tests start agents in parallel, and binding waits for the agent's start-up): an agent
/// that found its port in use is started again on another.
async fn start_agent() -> Agent {
    for _ in 0..5 {
        if let Some(agent) = try_start_agent().await {
            return agent;
        }
    }
    panic!("five agents in a row found their port taken");
}

/// Starts an agent on a free port; `None` if another process had the port.
async fn try_start_agent() -> Option<Agent> {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let node = format!("t{port}");
    let root = dir.path();
    write_fake_image(&root.join("images/fake"));
    let config = format!(
        "node = \"{node}\"\nlisten = \"127.0.0.1:{port}\"\nstate_dir = \"{s}\"\nimage_dir = \"{i}\"\n[storage_groups]\nsg0 = \"{g}\"\n[networks]\nbusiness = \"pvtestbr0\"\n",
        s = root.join("state").display(),
        i = root.join("images").display(),
        g = root.join("sg0").display(),
    );
    let config_path = root.join("agent.toml");
    std::fs::write(&config_path, config).unwrap();
    let log_path = root.join("agent.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_pv-agent"))
        .arg("--config")
        .arg(&config_path)
        .stderr(log.try_clone().unwrap())
        .stdout(log)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + AGENT_READY_TIMEOUT;
    let mut client = loop {
        if let Some(status) = child.try_wait().unwrap() {
            let text = log_of(&log_path);
            if text.contains("in use") {
                return None;
            }
            panic!("agent exited ({status}) before it listened; log: {text}");
        }
        match AgentClient::connect(format!("http://127.0.0.1:{port}")).await {
            Ok(c) => break c,
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(e) => panic!("agent did not listen: {e}; log: {}", log_of(&log_path)),
        }
    };
    let facts = client
        .get_host_facts(pb::GetHostFactsRequest {})
        .await
        .unwrap_or_else(|e| panic!("host facts: {e}; log: {}", log_of(&log_path)))
        .into_inner();
    if facts.node != node {
        // Another test's agent holds the port; ours exits (or has) for it.
        let _ = child.kill();
        let _ = child.wait();
        return None;
    }
    Some(Agent {
        _child: Reaped(child),
        client,
        node,
        log: log_path,
        _dir: dir,
    })
}

/// The reply of a call that must succeed, or a failure that shows the agent's log.
fn ok<T>(reply: Result<tonic::Response<T>, tonic::Status>, log: &Path) -> T {
    reply
        .unwrap_or_else(|e| panic!("{e}; agent log: {}", log_of(log)))
        .into_inner()
}

/// The authority of a serving controller at `term` for the test VM.
fn fence(term: i64) -> Option<pb::Fence> {
    Some(pb::Fence {
        term,
        generation: 1,
    })
}

fn command(term: i64) -> pb::DomainCommand {
    pb::DomainCommand {
        uuid: UUID.into(),
        fence: fence(term),
        track_writes: false,
        resume_standby: false,
    }
}

fn spec(volume: &str) -> pb::VmSpec {
    pb::VmSpec {
        uuid: UUID.into(),
        name: "itest1".into(),
        vcpus: 1,
        memory_mib: 128,
        disks: vec![pb::DiskSpec {
            storage_group: "sg0".into(),
            volume: volume.into(),
            format: pb::VolumeFormat::Raw.into(),
        }],
        nics: vec![],
        boot: Some(pb::vm_spec::Boot::KernelImage("fake".into())),
        self_fence: false,
        ft: false,
    }
}

#[tokio::test]
async fn agent_defines_domain_on_created_volume_and_cleans_up() {
    let mut agent = start_agent().await;
    let log = agent.log.clone();
    let c = &mut agent.client;

    let facts = ok(c.get_host_facts(pb::GetHostFactsRequest {}).await, &log);
    let volume = ok(
        c.create_volume(pb::CreateVolumeRequest {
            storage_group: "sg0".into(),
            name: "itest1-d0.raw".into(),
            size_bytes: 16 << 20,
            format: pb::VolumeFormat::Raw.into(),
            vm_uuid: UUID.into(),
            fence: fence(5),
        })
        .await,
        &log,
    );
    let defined = ok(
        c.define_domain(pb::DefineDomainRequest {
            spec: Some(spec("itest1-d0.raw")),
            fence: fence(5),
        })
        .await,
        &log,
    );
    let listed = ok(c.list_domains(pb::ListDomainsRequest {}).await, &log);
    ok(c.undefine_domain(command(5)).await, &log);
    ok(
        c.delete_volume(pb::DeleteVolumeRequest {
            storage_group: "sg0".into(),
            name: "itest1-d0.raw".into(),
            vm_uuid: UUID.into(),
            fence: fence(5),
        })
        .await,
        &log,
    );
    let after = ok(c.list_domains(pb::ListDomainsRequest {}).await, &log);

    assert_eq!(facts.node, agent.node);
    assert_eq!(facts.boot_images, vec!["fake".to_string()]);
    assert!(
        facts.qemu_version.starts_with("10."),
        "QEMU {}",
        facts.qemu_version
    );
    assert_eq!(facts.storage_groups[0].name, "sg0");
    assert!(!Path::new(&volume.path).exists(), "volume file left behind");
    assert_eq!(defined.state(), pb::DomainState::Shutoff);
    assert_eq!(
        listed
            .domains
            .iter()
            .map(|d| d.name.as_str())
            .collect::<Vec<_>>(),
        vec!["itest1"]
    );
    assert!(after.domains.is_empty());
}

#[tokio::test]
async fn agent_refuses_bad_input_with_clear_errors() {
    let mut agent = start_agent().await;
    let c = &mut agent.client;

    let bad_group = c
        .create_volume(pb::CreateVolumeRequest {
            storage_group: "nope".into(),
            name: "v.raw".into(),
            size_bytes: 1 << 20,
            format: pb::VolumeFormat::Raw.into(),
            vm_uuid: UUID.into(),
            fence: fence(5),
        })
        .await
        .unwrap_err();
    let bad_name = c
        .create_volume(pb::CreateVolumeRequest {
            storage_group: "sg0".into(),
            name: "../escape".into(),
            size_bytes: 1 << 20,
            format: pb::VolumeFormat::Raw.into(),
            vm_uuid: UUID.into(),
            fence: fence(5),
        })
        .await
        .unwrap_err();
    let bad_image = c
        .define_domain(pb::DefineDomainRequest {
            spec: Some(pb::VmSpec {
                boot: Some(pb::vm_spec::Boot::KernelImage("missing".into())),
                self_fence: false,
                ft: false,
                ..spec("v.raw")
            }),
            fence: fence(5),
        })
        .await
        .unwrap_err();
    let unknown = c.start_domain(command(5)).await.unwrap_err();
    let listed = c
        .list_domains(pb::ListDomainsRequest {})
        .await
        .unwrap()
        .into_inner();

    assert_eq!(bad_group.code(), tonic::Code::InvalidArgument);
    assert!(
        bad_group.message().contains("known: sg0"),
        "{}",
        bad_group.message()
    );
    assert_eq!(bad_name.code(), tonic::Code::InvalidArgument);
    assert_eq!(bad_image.code(), tonic::Code::FailedPrecondition);
    assert!(
        bad_image.message().contains("boot image missing"),
        "{}",
        bad_image.message()
    );
    assert_eq!(unknown.code(), tonic::Code::NotFound);
    assert!(listed.domains.is_empty());
}

#[tokio::test]
async fn agent_refuses_commands_of_an_older_term_or_without_one() {
    let mut agent = start_agent().await;
    let c = &mut agent.client;

    c.create_volume(pb::CreateVolumeRequest {
        storage_group: "sg0".into(),
        name: "itest1-d0.raw".into(),
        size_bytes: 1 << 20,
        format: pb::VolumeFormat::Raw.into(),
        vm_uuid: UUID.into(),
        fence: fence(9),
    })
    .await
    .unwrap();
    let stale = c.destroy_domain(command(8)).await.unwrap_err();
    let unfenced = c
        .destroy_domain(pb::DomainCommand {
            uuid: UUID.into(),
            fence: None,
            track_writes: false,
            resume_standby: false,
        })
        .await
        .unwrap_err();
    let health = c
        .get_peer_health(pb::GetPeerHealthRequest {})
        .await
        .unwrap()
        .into_inner();

    assert_eq!(stale.code(), tonic::Code::Aborted);
    assert!(
        stale
            .message()
            .contains("stale term 8: this host has seen term 9"),
        "{}",
        stale.message()
    );
    assert_eq!(unfenced.code(), tonic::Code::Aborted);
    assert_eq!(health.term, 9);
    assert!(!health.lease_alive);
}
