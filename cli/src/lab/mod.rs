//! `pvctl lab`: a whole two-node pair on one machine. Each host is a network namespace with its
//! own etcd member, agent (own libvirt embed root and storage) and controller; a third namespace
//! is the witness. Each host has a simulated BMC the controllers fence it with ([`bmc`]). See
//! [`plan`] for names and addresses.

pub mod bmc;
pub mod command;
pub mod faults;
mod net;
pub mod pki;
pub mod plan;
mod procs;
pub mod shaping;

use std::fmt::Write as _;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use proto::v1 as pb;

use pki::Pki;
pub use plan::Plan;
use plan::{
    AGENT_PORT, API_PORT, BMC_PASSWORD, BMC_PORT, BMC_USER, BUSINESS_BRIDGE, BUSINESS_NETWORK,
    ETCD_CLIENT_PORT, ETCD_PEER_PORT, HOSTS, Host, MGMT_DEV, STORAGE_GROUP,
};
use procs::Daemon;

/// Time for the three etcd members to form a cluster.
const ETCD_READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Time for the agents to listen (a fresh embed root needs no probe to listen).
const AGENT_READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Time for a restarted controller to connect to etcd and listen on its API port.
const CONTROLLER_READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Time for a controller to be elected and both nodes to report their facts.
const PAIR_READY_TIMEOUT: Duration = Duration::from_secs(120);
/// vCPUs per host CPU in the lab: both simulated hosts share this machine's few cores.
const LAB_VCPU_OVERCOMMIT: u32 = 8;
/// TTL of each agent's host lease: how soon a dead host's lease expires (etcd's minimum).
const LAB_HOST_LEASE_TTL: u32 = 2;
/// TTL of each controller's lease: how soon the peer takes over from a dead controller.
const LAB_CONTROLLER_LEASE_TTL: u32 = 2;
/// How long n1's controller waits before fencing n0 (n0's fences at once): if both ever
/// fenced at the same moment, both hosts would go down.
const LAB_N1_FENCE_DELAY_MS: u64 = 1000;
/// UDP port of the agents' heartbeats.
const HEARTBEAT_PORT: u16 = 7702;
/// etcd compacts history older than this, so the pair never fills its space quota.
const ETCD_COMPACTION_RETENTION: &str = "5m";
/// etcd's Raft heartbeat (ms).
const ETCD_HEARTBEAT_MS: &str = "50";
/// etcd's Raft election timeout (ms).
const ETCD_ELECTION_MS: &str = "500";
/// etcd's space quota (bytes): a full quota makes etcd read-only, which the pair reports.
const ETCD_QUOTA_BYTES: &str = "1073741824";

/// Prints a numbered step and returns when it started.
fn step(n: u32, text: &str) -> Instant {
    println!("[{n}/7] {text}");
    Instant::now()
}

fn done(started: Instant, detail: &str) {
    println!(
        "      ok ({:.1} s){detail}",
        started.elapsed().as_secs_f64()
    );
}

/// Brings the lab up, starting only what is not running yet.
pub async fn up(plan: &Plan) -> anyhow::Result<()> {
    let total = Instant::now();
    let t = step(1, "checking prerequisites");
    let bins = prerequisites()?;
    done(t, "");

    let t = step(2, "tiny guest image (built once, then cached)");
    let cache = cache_dir();
    let image = images::ensure_tiny_guest(&cache)?;
    for host in HOSTS.iter().filter(|h| !h.is_witness()) {
        let dst = plan
            .host_dir(host)
            .join("images")
            .join(images::TINY_GUEST_NAME);
        std::fs::create_dir_all(plan.host_dir(host).join("images"))?;
        images::BootImage::install(&image, &dst)?;
    }
    done(t, &format!(": {}", image.display()));

    let t = step(3, "hosts and networks (namespaces, veth links, bridges)");
    net::up(plan)?;
    done(
        t,
        &format!(
            ": namespaces {}",
            HOSTS
                .iter()
                .map(|h| plan.ns(h))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    );

    let t = step(
        4,
        "BMCs (ipmi_sim in a namespace of its own per node, on the management net)",
    );
    bmc::up(plan)?;
    done(t, "");

    let t = step(5, "etcd members on n0, n1 and the witness");
    for host in &HOSTS {
        start(plan, &etcd_daemon(plan, host))?;
    }
    wait_etcd(plan)?;
    done(t, "");

    let t = step(6, "agents (libvirt embed roots, storage, serial capture)");
    Pki::of(plan).ensure(plan)?;
    for host in HOSTS.iter().filter(|h| !h.is_witness()) {
        write_agent_config(plan, host)?;
        start(plan, &agent_daemon(plan, host, &bins.agent))?;
    }
    for host in HOSTS.iter().filter(|h| !h.is_witness()) {
        wait_agent(plan, host)?;
    }
    done(t, "");

    let t = step(7, "controllers (election through etcd, system IP)");
    for host in HOSTS.iter().filter(|h| !h.is_witness()) {
        write_controller_config(plan, host)?;
        start(plan, &controller_daemon(plan, host, &bins.controller))?;
    }
    let serving = wait_pair(plan).await?;
    done(t, &format!(": {serving} serves on {}", plan.system_ip()));

    let pki = Pki::of(plan);
    let token = crate::access::lab_token(&pki.admin_token())?;
    println!(
        "lab up in {:.1} s. API endpoints (TLS, CA {}): {}\nadmin token (also in {}, which pvctl reads as root): {token}\nconsole: https://{sysip}:{API_PORT}/ (log in with the admin token; the browser must trust {} or accept the certificate)\nhealth: https://{sysip}:{API_PORT}/health\n  pvctl node-info\n  pvctl vm-create demo --mode ha --disk 16M --network {BUSINESS_NETWORK} --kernel-image {}\n  pvctl lab down",
        total.elapsed().as_secs_f64(),
        pki.ca().display(),
        plan.endpoints(),
        pki.admin_token().display(),
        pki.ca().display(),
        images::TINY_GUEST_NAME,
        sysip = plan.system_ip(),
    );
    Ok(())
}

/// Starts node `host`'s etcd member, agent and controller (whichever is not running) as `lab up`
/// does, each once the one before listens. It waits for listening only, not for a healthy
/// cluster: a node may come back into a partition.
fn start_node(plan: &Plan, host: &Host) -> anyhow::Result<()> {
    let bins = prerequisites()?;
    start(plan, &etcd_daemon(plan, host))?;
    wait_tcp(
        SocketAddr::from((plan.mgmt_ip(host), ETCD_CLIENT_PORT)),
        ETCD_READY_TIMEOUT,
    )
    .with_context(|| {
        format!(
            "etcd on {} did not listen; see {}",
            host.name,
            log_path(plan, host, "etcd").display()
        )
    })?;
    write_agent_config(plan, host)?;
    start(plan, &agent_daemon(plan, host, &bins.agent))?;
    wait_agent(plan, host)?;
    write_controller_config(plan, host)?;
    start(plan, &controller_daemon(plan, host, &bins.controller))?;
    wait_tcp(
        SocketAddr::from((plan.mgmt_ip(host), API_PORT)),
        CONTROLLER_READY_TIMEOUT,
    )
    .with_context(|| {
        format!(
            "controller on {} did not listen; see {}",
            host.name,
            log_path(plan, host, "controller").display()
        )
    })
}

/// Stops everything the lab started, removes its networks and, unless `keep_data`, its data.
pub fn down(plan: &Plan, keep_data: bool) -> anyhow::Result<()> {
    let marker = marker(plan);
    let pid_dir = plan.pid_dir();
    // First, so no power-on request restarts a host while it is taken down.
    bmc::down(plan)?;
    let order = ["controller", "agent"];
    for kind in order {
        for host in HOSTS.iter().filter(|h| !h.is_witness()) {
            stop_daemon(&pid_dir, &format!("{}-{kind}", host.name), &marker);
        }
    }
    for host in HOSTS.iter().filter(|h| !h.is_witness()) {
        for pid in guest_pids(plan, host) {
            if !procs::alive_with_marker(pid, &marker) {
                continue;
            }
            match procs::stop(pid, &marker) {
                Ok(()) => println!("stopped guest QEMU {pid} on {}", host.name),
                Err(e) => eprintln!("could not stop guest QEMU {pid} on {}: {e}", host.name),
            }
        }
    }
    for host in &HOSTS {
        stop_daemon(&pid_dir, &format!("{}-etcd", host.name), &marker);
    }
    net::down(plan)?;
    println!("removed namespaces and bridge {}", plan.bridge());
    // FT guests' RAM files on tmpfs: a killed host's agent never removed its guests' own.
    let ram = plan.ram_dir();
    if ram.exists() {
        std::fs::remove_dir_all(&ram).with_context(|| format!("removing {}", ram.display()))?;
        println!("removed {}", ram.display());
    }
    if !keep_data && plan.dir().exists() {
        std::fs::remove_dir_all(plan.dir())
            .with_context(|| format!("removing {}", plan.dir().display()))?;
        println!("removed {}", plan.dir().display());
    }
    Ok(())
}

/// A summary of the lab's processes and addresses.
pub fn status(plan: &Plan) -> String {
    let marker = marker(plan);
    let mut out = String::new();
    for host in &HOSTS {
        let _ = writeln!(
            out,
            "{} ({}, {}): namespace {}",
            host.name,
            if host.is_witness() { "witness" } else { "node" },
            plan.mgmt_ip(host),
            if net::host_exists(plan, host) {
                "present"
            } else {
                "missing"
            },
        );
        for kind in daemon_kinds(host) {
            let name = format!("{}-{kind}", host.name);
            let state = match procs::running(&procs::pid_file(&plan.pid_dir(), &name), &marker) {
                Some(pid) => format!("running, PID {pid}"),
                None => "stopped".into(),
            };
            let _ = writeln!(
                out,
                "  {kind:<10} {state}  log {}",
                log_path(plan, host, kind).display()
            );
        }
    }
    let _ = writeln!(
        out,
        "system IP {}; API endpoints {}",
        plan.system_ip(),
        plan.endpoints()
    );
    out
}

fn daemon_kinds(host: &Host) -> &'static [&'static str] {
    if host.is_witness() {
        &["etcd"]
    } else {
        &["bmc", "etcd", "agent", "controller"]
    }
}

fn stop_daemon(pid_dir: &Path, name: &str, marker: &str) {
    if let Some(pid) = procs::running(&procs::pid_file(pid_dir, name), marker) {
        match procs::stop(pid, marker) {
            Ok(()) => println!("stopped {name} (PID {pid})"),
            Err(e) => eprintln!("could not stop {name} (PID {pid}): {e}"),
        }
    }
}

/// The PIDs of the guests' QEMU processes on `host`, from its embed root.
fn guest_pids(plan: &Plan, host: &Host) -> Vec<i32> {
    let dir = plan.host_dir(host).join("agent/libvirt/run/qemu");
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter(|e| e.path().extension().is_some_and(|x| x == "pid"))
        .filter_map(|e| std::fs::read_to_string(e.path()).ok()?.trim().parse().ok())
        .collect()
}

/// What every lab process's command line contains: a path inside the lab directory (the
/// trailing '/' keeps a sibling directory such as `<lab>2` from matching).
fn marker(plan: &Plan) -> String {
    format!("{}/", plan.dir().to_string_lossy().trim_end_matches('/'))
}

fn log_path(plan: &Plan, host: &Host, kind: &str) -> PathBuf {
    plan.host_dir(host).join("logs").join(format!("{kind}.log"))
}

fn start(plan: &Plan, daemon: &Daemon) -> anyhow::Result<()> {
    let (pid, started) = procs::ensure(daemon, &plan.pid_dir())?;
    let how = if started {
        "started"
    } else {
        "already running"
    };
    println!(
        "      {} {how} (PID {pid}), log {}",
        daemon.name,
        daemon.log.display()
    );
    Ok(())
}

struct Binaries {
    agent: PathBuf,
    controller: PathBuf,
}

/// Fails unless pvctl runs as root (namespaces, links and nftables need it).
fn require_root() -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions and touches no memory.
    #[allow(unsafe_code)]
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        bail!("the lab creates network namespaces: run it as root");
    }
    Ok(())
}

/// Checks root, the sibling binaries and the system tools the lab needs.
fn prerequisites() -> anyhow::Result<Binaries> {
    require_root()?;
    let exe = std::env::current_exe().context("locating pvctl")?;
    let dir = exe.parent().context("locating pvctl's directory")?;
    let bins = Binaries {
        agent: dir.join("pv-agent"),
        controller: dir.join("pv-controller"),
    };
    for bin in [&bins.agent, &bins.controller] {
        if !bin.is_file() {
            bail!(
                "{} is missing: build the workspace (cargo build)",
                bin.display()
            );
        }
    }
    let tools = [
        "etcd",
        "etcdctl",
        "qemu-system-x86_64",
        "qemu-img",
        "ip",
        "ipmi_sim",
        "ipmitool",
        "setsid",
    ];
    for tool in tools {
        if which(tool).is_none() {
            bail!("{tool} is not installed: run scripts/install-deps.sh");
        }
    }
    Ok(bins)
}

/// The path of `tool` on `PATH`, if it is installed.
fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_string_lossy()
        .split(':')
        .map(|d| Path::new(d).join(tool))
        .find(|p| p.is_file())
}

/// Where built images are cached: `$PAIRVISOR_CACHE`, else /var/cache/pairvisor.
fn cache_dir() -> PathBuf {
    std::env::var_os("PAIRVISOR_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/pairvisor"))
}

fn etcd_daemon(plan: &Plan, host: &Host) -> Daemon {
    let ip = plan.mgmt_ip(host);
    let client = format!("http://{ip}:{ETCD_CLIENT_PORT}");
    let peer = format!("http://{ip}:{ETCD_PEER_PORT}");
    let data = plan.host_dir(host).join("etcd");
    let args = [
        "etcd",
        "--name",
        host.name,
        "--data-dir",
        &data.to_string_lossy(),
        "--listen-client-urls",
        &client,
        "--advertise-client-urls",
        &client,
        "--listen-peer-urls",
        &peer,
        "--initial-advertise-peer-urls",
        &peer,
        "--initial-cluster",
        &plan.etcd_initial_cluster(),
        "--initial-cluster-state",
        "new",
        "--initial-cluster-token",
        "pairvisor-lab",
        "--auto-compaction-mode",
        "periodic",
        "--auto-compaction-retention",
        ETCD_COMPACTION_RETENTION,
        "--quota-backend-bytes",
        ETCD_QUOTA_BYTES,
        // Our clients ping every 2 s to notice a dead member fast; etcd's default minimum of
        // 5 s answers that with GOAWAY, breaking every long call (a campaign, a watch).
        "--grpc-keepalive-min-time",
        "1s",
        // A dead Raft leader is replaced in 0.5-1 s instead of 1-2 s: the pair's writes stall
        // that long. Members are one hop apart; a spurious election only stalls writes briefly
        // (a controller's lease is then in doubt, never lost).
        "--heartbeat-interval",
        ETCD_HEARTBEAT_MS,
        "--election-timeout",
        ETCD_ELECTION_MS,
        // A member cut off from the others (an isolated host) must not come back with a
        // higher term and depose the leader: that election stalls every lease renewal, and
        // the survivor's agent, unable to confirm its lease, self-fences its HA VMs (seen in
        // CI on heal). Pre-vote (off by default in etcd 3.4) keeps such a rejoin quiet.
        "--pre-vote=true",
        "--logger",
        "zap",
        "--log-level",
        "info",
    ]
    .map(String::from);
    Daemon {
        ns: plan.ns(host),
        name: format!("{}-etcd", host.name),
        argv: args.to_vec(),
        log: log_path(plan, host, "etcd"),
        marker: marker(plan),
    }
}

fn agent_daemon(plan: &Plan, host: &Host, bin: &Path) -> Daemon {
    let config = plan.host_dir(host).join("agent.toml");
    Daemon {
        ns: plan.ns(host),
        name: format!("{}-agent", host.name),
        argv: vec![
            bin.to_string_lossy().into_owned(),
            "--config".into(),
            config.to_string_lossy().into_owned(),
        ],
        log: log_path(plan, host, "agent"),
        marker: marker(plan),
    }
}

fn controller_daemon(plan: &Plan, host: &Host, bin: &Path) -> Daemon {
    let config = plan.host_dir(host).join("controller.toml");
    Daemon {
        ns: plan.ns(host),
        name: format!("{}-controller", host.name),
        argv: vec![
            bin.to_string_lossy().into_owned(),
            "--config".into(),
            config.to_string_lossy().into_owned(),
        ],
        log: log_path(plan, host, "controller"),
        marker: marker(plan),
    }
}

fn write_agent_config(plan: &Plan, host: &Host) -> anyhow::Result<()> {
    let dir = plan.host_dir(host);
    let pki = Pki::of(plan);
    let endpoints = quoted(&plan.etcd_endpoints_from(host));
    let paths: Vec<String> = plan
        .heartbeat_paths(host)
        .iter()
        .map(|(name, local, peer)| {
            format!("  {{ name = \"{name}\", local = \"{local}\", peer = \"{peer}\" }},")
        })
        .collect();
    let (alink_role, alinks) = plan.alink(host);
    let alinks: Vec<String> = alinks.iter().map(ToString::to_string).collect();
    let text = format!(
        "# Written by `pvctl lab up`.\nnode = \"{node}\"\nlisten = \"{ip}:{AGENT_PORT}\"\nstate_dir = \"{state}\"\nram_dir = \"{ram}\"\nimage_dir = \"{images}\"\ndomain_type = \"qemu\"\netcd_endpoints = [{endpoints}]\nhost_lease_ttl_seconds = {LAB_HOST_LEASE_TTL}\n\n[heartbeat]\nport = {HEARTBEAT_PORT}\ninterval_ms = 100\npaths = [\n{paths}\n]\n\n[system_ip]\naddress = \"{system}/24\"\ndevice = \"{MGMT_DEV}\"\n\n[storage_groups]\n{STORAGE_GROUP} = \"{storage}\"\n\n[networks]\n{BUSINESS_NETWORK} = \"{BUSINESS_BRIDGE}\"\n\n[alink]\nrole = \"{alink_role}\"\nlinks = [{alinks}]\n\n# Only the peer agent's certificate is admitted.\n[alink.tls]\ncert = \"{cert}\"\nkey = \"{key}\"\nca = \"{agents_ca}\"\npeer = \"{peer}\"\n\n# Only the controllers' certificates are admitted.\n[tls]\ncert = \"{cert}\"\nkey = \"{key}\"\nca = \"{ca}\"\n",
        node = host.name,
        ip = plan.mgmt_ip(host),
        state = dir.join("agent").display(),
        ram = plan.ram_dir().join(host.name).display(),
        images = dir.join("images").display(),
        storage = dir.join("storage").join(STORAGE_GROUP).display(),
        paths = paths.join("\n"),
        system = plan.system_ip(),
        alinks = quoted(&alinks),
        cert = pki.agent(host).cert.display(),
        key = pki.agent(host).key.display(),
        ca = pki.controllers_ca().display(),
        agents_ca = pki.agents_ca().display(),
        peer = Plan::peer(host).name,
    );
    write(&dir.join("agent.toml"), &text)
}

/// `"a", "b"`: items as a TOML array body.
fn quoted(items: &[String]) -> String {
    items
        .iter()
        .map(|e| format!("\"{e}\""))
        .collect::<Vec<_>>()
        .join(", ")
}

fn write_controller_config(plan: &Plan, host: &Host) -> anyhow::Result<()> {
    let dir = plan.host_dir(host);
    let pki = Pki::of(plan);
    let endpoints = quoted(&plan.etcd_endpoints_from(host));
    let fence_delay_ms = if host.index == 1 {
        LAB_N1_FENCE_DELAY_MS
    } else {
        0
    };
    let text = format!(
        "# Written by `pvctl lab up`.\nnode = \"{node}\"\nlisten = \"0.0.0.0:{API_PORT}\"\napi_address = \"{ip}:{API_PORT}\"\netcd_endpoints = [{endpoints}]\nlease_ttl_seconds = {LAB_CONTROLLER_LEASE_TTL}\n# Fencing: only n1 waits before it fences, so the two never fence each other at once.\nfence_delay_ms = {fence_delay_ms}\nhost_lease_ttl_seconds = {LAB_HOST_LEASE_TTL}\n\n[system_ip]\naddress = \"{system}/24\"\ndevice = \"{MGMT_DEV}\"\n\n[capacity]\nreserve_vcpus = 2\nreserve_memory_mib = 4096\nvcpu_overcommit = {LAB_VCPU_OVERCOMMIT}\n\n# The agents are called with this controller's certificate; only the agents' CA is trusted.\n[agent_tls]\ncert = \"{cert}\"\nkey = \"{key}\"\nca = \"{agents_ca}\"\n\n[api_tls]\ncert = \"{api_cert}\"\nkey = \"{api_key}\"\nca = \"{ca}\"\n\n[auth]\ntokens_file = \"{tokens}\"\n{bmcs}",
        node = host.name,
        ip = plan.mgmt_ip(host),
        system = plan.system_ip(),
        bmcs = bmc_sections(plan),
        cert = pki.controller(host).cert.display(),
        key = pki.controller(host).key.display(),
        ca = pki.ca().display(),
        api_cert = pki.api(host).cert.display(),
        api_key = pki.api(host).key.display(),
        tokens = pki.tokens_file().display(),
        agents_ca = pki.agents_ca().display(),
    );
    write(&dir.join("controller.toml"), &text)
}

/// The controllers' `[bmc.<node>]` sections: the lab's simulated BMCs (a lab password).
fn bmc_sections(plan: &Plan) -> String {
    HOSTS
        .iter()
        .filter(|h| !h.is_witness())
        .map(|h| {
            format!(
                "\n[bmc.{}]\naddress = \"{}\"\nport = {BMC_PORT}\nuser = \"{BMC_USER}\"\npassword = \"{BMC_PASSWORD}\"\n",
                h.name,
                plan.bmc_ip(h)
            )
        })
        .collect()
}

fn write(path: &Path, text: &str) -> anyhow::Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

fn wait_tcp(address: SocketAddr, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if TcpStream::connect_timeout(&address, Duration::from_millis(500)).is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "{address} did not accept connections within {} s",
                timeout.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Waits until the agent of `host` accepts connections.
fn wait_agent(plan: &Plan, host: &Host) -> anyhow::Result<()> {
    wait_tcp(
        SocketAddr::from((plan.mgmt_ip(host), AGENT_PORT)),
        AGENT_READY_TIMEOUT,
    )
    .with_context(|| {
        format!(
            "agent on {} did not listen; see {}",
            host.name,
            log_path(plan, host, "agent").display()
        )
    })
}

/// Waits until every etcd member reports healthy (the cluster has a leader).
fn wait_etcd(plan: &Plan) -> anyhow::Result<()> {
    let endpoints = plan.etcd_endpoints().join(",");
    let deadline = Instant::now() + ETCD_READY_TIMEOUT;
    loop {
        let output = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .args([
                "--endpoints",
                &endpoints,
                "--dial-timeout",
                "2s",
                "endpoint",
                "health",
            ])
            .output()
            .context("running etcdctl")?;
        if output.status.success() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "etcd cluster not healthy within {} s: {}; see the etcd logs under {}",
                ETCD_READY_TIMEOUT.as_secs(),
                String::from_utf8_lossy(&output.stderr).trim(),
                plan.dir().display()
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Waits until a controller serves and both nodes report facts; returns the serving node.
async fn wait_pair(plan: &Plan) -> anyhow::Result<String> {
    let deadline = Instant::now() + PAIR_READY_TIMEOUT;
    let mut last = String::from("no answer yet");
    while Instant::now() < deadline {
        match nodes(plan).await {
            Ok(resp) => {
                let up = resp
                    .nodes
                    .iter()
                    .filter(|n| n.cpus > 0 && n.state() == pb::NodeState::Up)
                    .count();
                let serving = resp
                    .nodes
                    .iter()
                    .find(|n| n.role() == pb::NodeRole::Serving);
                if let (2, Some(serving)) = (up, serving) {
                    return Ok(serving.name.clone());
                }
                last = format!("{up} of 2 nodes up");
            }
            Err(e) => last = format!("{e:#}"),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    bail!(
        "the pair did not become ready within {} s ({last}); see the controller logs under {}",
        PAIR_READY_TIMEOUT.as_secs(),
        plan.dir().display()
    )
}

async fn nodes(plan: &Plan) -> anyhow::Result<pb::ListNodesResponse> {
    let pki = Pki::of(plan);
    let endpoints = crate::client::Endpoints {
        list: plan.endpoints(),
        ca: Some(pki.ca()),
        token: Some(crate::access::lab_token(&pki.admin_token())?),
    };
    let mut api = crate::client::connect(&endpoints).await?;
    Ok(api.list_nodes(pb::ListNodesRequest {}).await?.into_inner())
}
