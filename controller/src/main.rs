//! `pv-controller`: Pairvisor's per-host controller daemon.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use tokio::sync::watch;

use controller::agents::AgentPool;
use controller::api::{Api, Route};
use controller::config::Config;
use controller::membership::{self, Role};
use controller::serving::{self, Deps};
use controller::store;

/// Pairvisor controller: elects the serving controller through etcd and serves the public API.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Controller configuration file (TOML).
    #[arg(long, short, env = "PV_CONTROLLER_CONFIG")]
    config: PathBuf,
}

fn main() -> anyhow::Result<()> {
    daemon::init_logging();
    let args = Args::parse();
    let config = Config::load(&args.config)?;
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    let result = runtime.block_on(run(config.clone()));
    if let Err(e) = &result {
        tracing::error!(node = %config.node, error = format!("{e:#}"), "controller stopped");
    }
    result
}

async fn run(config: Config) -> anyhow::Result<()> {
    let client = store::Etcd::connect(&config.etcd_endpoints, Some(store::REQUEST_TIMEOUT)).await?;
    let waiting = store::Etcd::connect(&config.etcd_endpoints, None).await?;
    let agents = AgentPool::default();
    let (role_tx, role_rx) = watch::channel(Role::Standby);
    let (route_tx, route_rx) = watch::channel(Route::Forward);
    tokio::spawn(membership::run(
        config.clone(),
        client.clone(),
        waiting,
        agents.clone(),
        role_tx,
    ));
    let deps = Deps {
        config: config.clone(),
        client: client.clone(),
        agents: agents.clone(),
    };
    tokio::spawn(serving::follow(deps, role_rx, route_tx));
    let api = Api::new(route_rx, client, agents);
    tracing::info!(node = %config.node, listen = %config.listen, "controller API listening");
    tonic::transport::Server::builder()
        .add_service(proto::v1::pairvisor_server::PairvisorServer::new(api))
        .serve_with_shutdown(config.listen, daemon::shutdown_signal())
        .await
        .with_context(|| format!("serving the API on {}", config.listen))?;
    if let Some(ip) = &config.system_ip {
        let _ = controller::sysip::release(ip).await;
    }
    tracing::info!(node = %config.node, "controller stopped by signal");
    Ok(())
}
