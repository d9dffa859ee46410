//! `pv-agent`: Pairvisor's per-host agent daemon.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::Parser;

use agent::config::Config;
use agent::libvirt::Libvirt;
use agent::service::AgentService;
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
    if config.libvirt_uri.is_none() {
        agent::embed::prepare(&config.embed_root())?;
    }
    let uri = config.libvirt_uri();
    let opened = Instant::now();
    let libvirt = Libvirt::open(&uri)?;
    tracing::info!(node = %config.node, %uri, ms = opened.elapsed().as_millis(), "libvirt connection open");
    let storage = StorageGroups::open(config.storage_groups.clone())?;
    let service = AgentService::new(config, libvirt.clone(), storage);
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(serve(config, libvirt, service))
}

async fn serve(config: &Config, libvirt: Libvirt, service: AgentService) -> anyhow::Result<()> {
    tokio::spawn(prewarm(libvirt));
    tracing::info!(node = %config.node, listen = %config.listen, domain_type = config.domain_type.as_str(), "agent serving");
    tonic::transport::Server::builder()
        .add_service(proto::agent::agent_server::AgentServer::new(service))
        .serve_with_shutdown(config.listen, daemon::shutdown_signal())
        .await
        .with_context(|| format!("serving the agent API on {}", config.listen))?;
    tracing::info!(node = %config.node, "agent stopped by signal; guests keep running");
    Ok(())
}

/// Runs QEMU's capability probe now (5–8 s on a fresh embed root) rather than in the first define.
async fn prewarm(libvirt: Libvirt) {
    let started = Instant::now();
    let result = libvirt
        .run(|conn| {
            conn.capabilities()
                .map_err(|source| agent::libvirt::Error::Call {
                    op: "reading capabilities".into(),
                    source,
                })
        })
        .await;
    match result {
        Ok(_) => tracing::info!(
            ms = started.elapsed().as_millis(),
            "QEMU capabilities ready"
        ),
        Err(e) => tracing::warn!(error = %e, "QEMU capability probe failed"),
    }
}
