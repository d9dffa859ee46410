//! `pv-agent`: Pairvisor's per-host agent daemon.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use daemon::etcd::Etcd;
use daemon::lease::LeaseView;
use tokio::sync::watch;

use agent::config::Config;
use agent::disk_fault;
use agent::facts::Collector;
use agent::fence::Fence;
use agent::heartbeat::Heartbeats;
use agent::libvirt::Libvirt;
use agent::membership::Membership;
use agent::replica::Replicas;
use agent::service::{AgentService, Deps};
use agent::stale::Marker;
use agent::storage::StorageGroups;

/// Pairvisor per-host agent: drives libvirt/QEMU, storage and guest consoles for the controllers.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Agent configuration file (TOML).
    #[arg(long, short, env = "PV_AGENT_CONFIG")]
    config: PathBuf,
}

fn main() -> anyhow::Result<()> {
    daemon::init_logging();
    let args = Args::parse();
    let config = Config::load(&args.config)?;
    if let Err(e) = run(&config) {
        tracing::error!(node = %config.node, error = format!("{e:#}"), "agent stopped");
        return Err(e);
    }
    Ok(())
}

fn run(config: &Config) -> anyhow::Result<()> {
    for dir in [&config.state_dir, &config.serial_dir(), &config.image_dir] {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let fence = Arc::new(Fence::open(&config.state_dir.join("fence.json"))?);
    if config.libvirt_uri.is_none() {
        agent::embed::prepare(&config.embed_root(), &config.ram_dir)?;
    }
    let uri = config.libvirt_uri();
    let opened = Instant::now();
    let libvirt = Libvirt::open(&uri)?;
    tracing::info!(node = %config.node, %uri, ms = opened.elapsed().as_millis(), "libvirt connection open");
    let storage = StorageGroups::open(config.storage_groups.clone())?;
    agent::isos::sweep(&storage);
    agent::export::sweep(&storage);
    agent::import::sweep(&storage);
    let facts = Collector::new(
        storage.clone(),
        config.image_dir.clone(),
        config.networks.clone(),
    )
    .context("reading host facts")?;
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(serve(config, libvirt, storage, facts, fence))
}

async fn serve(
    config: &Config,
    libvirt: Libvirt,
    storage: StorageGroups,
    facts: Collector,
    fence: Arc<Fence>,
) -> anyhow::Result<()> {
    let heartbeats = Heartbeats::start(
        &config.node,
        config.heartbeat.port,
        Duration::from_millis(config.heartbeat.interval_ms),
        &config.heartbeat.paths,
    );
    // Once, before the host registers: the probe behind it takes seconds (see facts).
    facts.read_versions(&libvirt).await;
    let replicas = start_replicas(config, storage.clone()).await?;
    let (lease_tx, lease) = watch::channel(LeaseView::NONE);
    let (lease_id_tx, lease_id) = watch::channel(0);
    let mut marker = None;
    if config.etcd_endpoints.is_empty() {
        tracing::warn!(node = %config.node, "no etcd_endpoints: running alone, without host lease or registration");
    } else {
        let etcd =
            Etcd::connect(&config.etcd_endpoints, Some(daemon::etcd::REQUEST_TIMEOUT)).await?;
        let membership = Membership {
            node: config.node.clone(),
            agent_address: config.advertise(),
            ttl: Duration::from_secs(config.host_lease_ttl_seconds),
            etcd: etcd.clone(),
            facts: facts.clone(),
            fence: fence.clone(),
            system_ip: config.system_ip.clone(),
            libvirt: libvirt.clone(),
            standbys: replicas.as_ref().map(|r| r.standbys().clone()),
        };
        let stale = Marker::new(etcd.clone(), config.node.clone(), lease_id);
        let watch = disk_fault::Watch {
            node: config.node.clone(),
            libvirt: libvirt.clone(),
            marker: stale.clone(),
        };
        marker = Some(stale);
        tokio::spawn(membership.run(lease_tx, lease_id_tx));
        tokio::spawn(watch.run());
    }
    let deps = Deps {
        libvirt,
        storage,
        facts,
        fence,
        heartbeats,
        lease,
        replicas,
        marker,
    };
    let service = AgentService::new(config, deps);
    tokio::spawn(service.recover());
    tracing::info!(node = %config.node, listen = %config.listen, domain_type = config.domain_type.as_str(), "agent serving");
    let mut server = proto::transport::server();
    match &config.tls {
        Some(tls) => {
            server = server
                .tls_config(tls.server()?)
                .context("setting up the agent API's TLS")?;
        }
        None => {
            tracing::warn!(node = %config.node, "the agent API runs without TLS: anyone who reaches {} can command this host; set [tls] in the config", config.listen);
        }
    }
    server
        .add_service(proto::agent::agent_server::AgentServer::new(service))
        .serve_with_shutdown(config.listen, daemon::shutdown_signal())
        .await
        .with_context(|| format!("serving the agent API on {}", config.listen))?;
    tracing::info!(node = %config.node, "agent stopped by signal; guests keep running");
    Ok(())
}

/// Starts the HA replica service when the config has A-Links to the peer.
async fn start_replicas(
    config: &Config,
    storage: StorageGroups,
) -> anyhow::Result<Option<Arc<Replicas>>> {
    let Some(alink) = &config.alink else {
        tracing::warn!(node = %config.node, "no [alink] section: no HA replica service on this host");
        return Ok(None);
    };
    let replicas = Replicas::start(&config.node, alink, &config.state_dir, storage)
        .await
        .context("starting the HA replica service")?;
    Ok(Some(Arc::new(replicas)))
}
